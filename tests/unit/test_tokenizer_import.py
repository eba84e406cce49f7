"""Two model loads at once (or a cancelled load's thread still running when the next starts)
both import transformers: that must not fail either load."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import threading
from services.modelserver.torch_engine.tokenizer import auto_tokenizer
errors = []
def load():
    try:
        auto_tokenizer()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
"""


def test_concurrent_first_imports_of_transformers_all_succeed():
    # a fresh interpreter: transformers must not be imported yet (without the lock this failed
    # 3 runs out of 3 with "cannot import name 'AutoTokenizer'")
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=180, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
