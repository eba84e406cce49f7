"""The TensorRT-LLM surface this backend relies on, recorded for the pinned version.

`contract.json` holds, for the pinned release, the keyword names of SamplingParams, of
LLM.generate_async, of KvCacheConfig, SchedulerConfig and the LLM arguments we set, and the LLM
methods we call. On CPU machines the tests check that every name our mapping produces is in that
record (and the fake TensorRT-LLM used by the behaviour tests is built from it, so it cannot drift).
Where tensorrt_llm is installed, the same test compares the record with the installed package.

    python -m services.modelserver.trtllm.contract            # compare with the installed package
    python -m services.modelserver.trtllm.contract --record   # rewrite contract.json from it
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .api import TrtApi, field_names

CONTRACT_PATH = Path(__file__).with_name("contract.json")
SECTIONS = ("SamplingParams", "generate_async", "KvCacheConfig", "SchedulerConfig", "LlmArgs", "LLM_methods")
#: The LLM methods and attributes the engine uses.
LLM_METHODS = ("generate_async", "get_stats_async", "get_kv_cache_events_async", "shutdown", "tokenizer")


def recorded() -> dict[str, Any]:
    return json.loads(CONTRACT_PATH.read_text())


def recorded_names(section: str) -> frozenset[str]:
    return frozenset(recorded()["sections"][section]["names"])


def installed_surface(api: TrtApi) -> dict[str, frozenset[str]]:
    """The same sections, read from an installed tensorrt_llm."""
    llm = api.LLM
    return {
        "SamplingParams": field_names(api.SamplingParams),
        "generate_async": field_names(getattr(llm, "generate_async", None)),
        "KvCacheConfig": field_names(api.KvCacheConfig),
        "SchedulerConfig": field_names(api.SchedulerConfig),
        "LlmArgs": field_names(api.LlmArgs),
        "LLM_methods": frozenset(m for m in LLM_METHODS if hasattr(llm, m) or m == "tokenizer"),
    }


def compare(installed: dict[str, frozenset[str]], version: str) -> list[str]:
    """Differences between the record and an installed package, as sentences (empty = match).

    Sections recorded completely must be equal for the pinned version; partial ones (transcribed
    from documentation that lists only some names) must be contained. Another version only has to
    contain every recorded name.
    """
    rec = recorded()
    same_version = version == rec["version"]
    problems = []
    for section in SECTIONS:
        entry = rec["sections"][section]
        want, have = frozenset(entry["names"]), installed[section]
        missing = sorted(want - have)
        if missing:
            problems.append(f"{section}: tensorrt_llm {version} lacks {missing}")
        extra = sorted(have - want)
        if same_version and entry.get("complete") and extra:
            problems.append(f"{section}: tensorrt_llm {version} has {extra} that the record lacks")
    return problems


def record(installed: dict[str, frozenset[str]], version: str) -> None:
    data = {"version": version,
            "provenance": f"recorded with `python -m services.modelserver.trtllm.contract --record` from "
                          f"tensorrt_llm {version}",
            "sections": {s: {"complete": True, "names": sorted(installed[s])} for s in SECTIONS}}
    CONTRACT_PATH.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="rewrite contract.json from the installed package")
    args = parser.parse_args(argv)
    from .api import import_api

    api = import_api()
    surface = installed_surface(api)
    if args.record:
        record(surface, api.version)
        print(f"recorded tensorrt_llm {api.version} in {CONTRACT_PATH}")
        return 0
    problems = compare(surface, api.version)
    for p in problems:
        print(p)
    print(f"tensorrt_llm {api.version}: " + ("contract holds" if not problems else f"{len(problems)} difference(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
