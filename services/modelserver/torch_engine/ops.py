"""The engine's C++ CPU kernels (csrc/*.cpp, *.h), built with torch's extension tooling.

`make setup` builds them (`python -m services.modelserver.torch_engine.ops`); at run time `load()`
imports the build, rebuilding only if the source changed. The build uses the system compiler with
OpenMP on (without it the kernels would run on one thread) and -march=native, so it is vectorised
for the CPU it was built on; the build folder is keyed by that CPU's feature flags and by the
sources (headers included, which torch's own change check does not see), so a copy moved to another
CPU rebuilds instead of dying with SIGILL. Any failure (no compiler, no ninja) leaves
`load()` returning None and the model on its plain-torch path, which is also the tests' oracle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from types import ModuleType

log = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(_HERE, "csrc")
SOURCES = [os.path.join(_CSRC, name) for name in ("cpu_ops.cpp", "paged_attention.cpp", "sampling.cpp",
                                                      "int8_linear.cpp")]
HEADERS = [os.path.join(_CSRC, name) for name in ("cpu_math.h", "cpu_vec.h")]
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
#: set to 1 to run the plain-torch path even when the op is built
DISABLE_ENV = "MESHSERVE_NO_CPU_OPS"

_lock = threading.Lock()
_cached: tuple[ModuleType | None, str] | None = None


def _cpu_key() -> str:
    """Short hash of what the build depends on: CPU features, torch, python and the sources."""
    import torch

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    text = "|".join([platform.machine(), flags, torch.__version__, sys.version.split()[0]])
    h = hashlib.sha1(text.encode())
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def build_dir() -> str:
    base = os.environ.get("MESHSERVE_BUILD_DIR") or os.path.join(_ROOT, "build")
    return os.path.join(base, f"cpu_ops-{_cpu_key()}")


def _flags() -> list[str]:
    # -fno-trapping-math: without it GCC keeps the clamps and selects in exp and softmax loops as
    # branches (a compare might trap), which leaves those loops scalar; results are unchanged
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native")
    return flags


def _build(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    folder = build_dir()
    os.makedirs(folder, exist_ok=True)
    # ninja comes from PyPI into the venv's bin, which is not on PATH unless the venv is activated
    venv_bin = os.path.dirname(sys.executable)
    if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(name="meshserve_cpu_ops", sources=SOURCES, build_directory=folder,
                              extra_cflags=_flags(), extra_ldflags=["-fopenmp"], verbose=verbose)


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled module, or None (plain-torch fallback); the reason is in `status()`."""
    global _cached
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    with _lock:
        if _cached is None:
            try:
                _cached = (_build(verbose), "built")
            except Exception as e:  # noqa: BLE001 - any build failure means: fall back, say why
                reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                log.warning("C++ CPU ops unavailable, using the plain-torch path: %s", reason)
                _cached = (None, f"unavailable: {reason}")
        return _cached[0]


def status() -> str:
    """'built', 'disabled' or 'unavailable: <reason>' (after load())."""
    if os.environ.get(DISABLE_ENV) == "1":
        return "disabled"
    return "not loaded" if _cached is None else _cached[1]


def main() -> int:
    """Build at install; never fails the install (the engine falls back), but says what happened."""
    mod = load(verbose="-v" in sys.argv)
    print(f"meshserve C++ CPU ops: {status()} ({build_dir()})")
    if mod is not None:
        print(f"  OpenMP threads: {mod.openmp_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
