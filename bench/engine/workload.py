"""The benchmark's one workload, made deterministically from a seed (stdlib only: peers import it).

Prompts are random token ids from the model's ordinary vocabulary (no two share a prefix, so no
system gets prefix-cache help), 32-512 tokens; outputs are 64-256 tokens, and every system is told
to ignore end-of-sequence so each request produces exactly its output length. Two workloads share
those requests: greedy, and sampled (temperature 0.8, top-p 0.95, a seed per request).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

LEVELS = (1, 4, 16, 64)
PROMPT_RANGE = (32, 512)
OUTPUT_RANGE = (64, 256)
TOKEN_RANGE = (1000, 40000)  # ordinary BPE tokens of the SmolLM2 vocabulary (no special tokens)
POISSON_REQUESTS = 32
POISSON_RATE = 2.0  # requests per second
#: sampling settings per workload; every runner maps them onto its own API
WORKLOADS = {"greedy": {"temperature": 0.0, "top_p": 1.0}, "sampled": {"temperature": 0.8, "top_p": 0.95}}


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float = 0.0  # offset from the scenario start (Poisson runs only)


@dataclass
class Scenario:
    """Either a closed loop (`concurrency` clients, each sends its next request when one ends)
    or open arrivals (each request at its arrival_s)."""

    name: str
    requests: list[Request]
    concurrency: int = 0  # 0: open-loop arrivals
    sampling: dict = field(default_factory=lambda: dict(WORKLOADS["greedy"]))

    def to_json(self) -> dict:
        return {"name": self.name, "concurrency": self.concurrency, "sampling": self.sampling,
                "requests": [asdict(r) for r in self.requests]}

    def with_sampling(self, workload: str) -> Scenario:
        """The same shapes (lengths, arrivals) under `workload`'s sampling, with fresh prompt tokens
        so a system's prefix cache gains nothing from having run the other workload first."""
        if workload == "greedy":
            return Scenario(self.name, self.requests, self.concurrency, dict(WORKLOADS[workload]))
        reqs = []
        for r in self.requests:
            rng = random.Random(f"{r.id}/{workload}")
            ids = [rng.randint(*TOKEN_RANGE) for _ in r.prompt_ids]
            reqs.append(Request(f"{r.id}-{workload}", ids, r.max_tokens, r.arrival_s))
        return Scenario(self.name, reqs, self.concurrency, dict(WORKLOADS[workload]))


def make_requests(n: int, seed: int, max_output: int | None = None) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plen = rng.randint(*PROMPT_RANGE)
        olen = rng.randint(*OUTPUT_RANGE)
        if max_output:
            olen = min(olen, max_output)
        out.append(Request(f"s{seed}-r{i}", [rng.randint(*TOKEN_RANGE) for _ in range(plen)], olen))
    return out


def closed_loop(level: int, requests_per_client: int = 2, max_requests: int | None = None,
                max_output: int | None = None) -> Scenario:
    """`level` clients sharing requests_per_client * level requests (capped by max_requests)."""
    n = level * requests_per_client
    if max_requests:
        n = min(n, max_requests)
    return Scenario(str(level), make_requests(n, seed=level, max_output=max_output), concurrency=level)


def poisson(n: int = POISSON_REQUESTS, rate: float = POISSON_RATE, max_output: int | None = None) -> Scenario:
    reqs = make_requests(n, seed=1000, max_output=max_output)
    rng = random.Random(7)
    t = 0.0
    for r in reqs:
        r.arrival_s = t
        t += rng.expovariate(rate)
    return Scenario("poisson", reqs)
