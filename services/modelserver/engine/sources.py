"""Where a deployed model's weights may come from: `embedded`, or a path relative to the model
directories a server was started with (`--model-dir DIR`, repeatable).

A deployment never names a host path: the control plane checks only the syntax (it never looks at
its own filesystem, so the API cannot be used to learn which paths exist), and each server
resolves the path under its own model directories. Models pinned on a server's command line
(`--model NAME=torch:/path`) are the host operator's configuration and may name any path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from services.common.errors import InvalidArgument

EMBEDDED = "embedded"
MAX_SOURCE_CHARS = 1024
#: Backends whose weights can be the packaged SmolLM2.
EMBEDDED_BACKENDS = ("torch",)


def check_source(backend: str, source: str) -> str:
    """The canonical source of a deployment, or InvalidArgument saying what is allowed."""
    if backend == "sim":
        if source not in ("", EMBEDDED, "sim"):
            raise InvalidArgument("the sim backend has no weights: leave source empty")
        return ""
    if source in ("", EMBEDDED):
        if backend not in EMBEDDED_BACKENDS:
            raise InvalidArgument(f"backend {backend} needs a source: a path relative to the "
                                  "model directories of the servers (--model-dir)")
        return EMBEDDED
    check_relative_path(source)
    return source


def check_relative_path(source: str) -> None:
    shown = repr(source)[:80]
    if len(source) > MAX_SOURCE_CHARS:
        raise InvalidArgument(f"source is longer than {MAX_SOURCE_CHARS} characters")
    if not source.isprintable() or "\\" in source:
        raise InvalidArgument(f"source {shown} must be printable text without backslashes")
    if source.startswith(("/", "~")):
        raise InvalidArgument(f"source {shown} is not allowed: give 'embedded' or a path relative "
                              "to the model directories of the servers (--model-dir), not a "
                              "host path")
    parts = source.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"source {shown} must be a plain relative path: no '..', '.' or "
                              "empty parts")


def resolve(source: str, model_dirs: Sequence[str], server_id: str) -> str:
    """A deployment's source on this server: `embedded`, or the first model directory holding
    it. Raises FileNotFoundError with an operator-facing reason when none does."""
    if source in ("", EMBEDDED):
        return EMBEDDED
    check_relative_path(source)
    for folder in model_dirs:
        candidate = os.path.join(folder, source)
        if os.path.exists(candidate):
            return candidate
    where = ", ".join(model_dirs) if model_dirs else "none: start it with --model-dir DIR"
    raise FileNotFoundError(f"source {source!r} not found in the model directories of server "
                            f"{server_id} ({where})")
