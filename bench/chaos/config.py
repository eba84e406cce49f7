"""How long and how hard each phase runs: the full benchmark and a short smoke run."""

from __future__ import annotations

from dataclasses import dataclass, replace

MODEL = "echo"  # pinned on every server (sim)
SCALED = "scaled"  # control-plane managed (sim), scaled up and down in phase 7
QUIET = "quiet"  # control-plane managed (sim), the model the non-reading clients ask
SERVERS = 3
ROUTERS = 2
CONTROLPLANES = 2
ETCD_MEMBERS = 3

#: The pass criteria of issue 8.
RESUME_WITHIN_S = 5.0
RESTART_SERVING_WITHIN_S = 5.0


@dataclass(frozen=True)
class Settings:
    smoke: bool = False
    tokens_per_second: int = 50  # per sequence: a 300-token answer lasts ~6 s
    concurrency: int = 24  # steady streams of the load
    long_tokens: int = 300  # answers of the server/router fault phases
    short_tokens: int = 120  # answers of the other phases
    warmup_s: float = 3.0  # load before a fault, so streams are mid-answer when it lands
    after_s: float = 8.0  # load after the mesh is whole again
    grace_s: float = 30.0  # for requests in flight when the load stops
    request_timeout_s: float = 90.0
    sigstop_s: float = 60.0
    etcd_down_s: float = 5.0
    quorum_loss_s: float = 20.0
    scale_every_s: float = 5.0
    scale_for_s: float = 30.0
    scale_tokens: int = 40
    nonreaders: int = 100
    nonreader_tokens: int = 2000  # 40 s at the pace: they outlast the phase
    nonreader_tokens_per_second: int = 50
    nonreader_baseline_s: float = 15.0
    nonreader_for_s: float = 30.0
    nonreader_after_s: float = 5.0
    ttft_tokens: int = 40  # answers of the readers whose TTFT phase 8 compares
    restore_timeout_s: float = 90.0

    def answer_s(self, tokens: int) -> float:
        """How long an answer of `tokens` streams at the benchmark's pace."""
        return tokens / self.tokens_per_second


FULL = Settings()
SMOKE = replace(FULL, smoke=True, concurrency=8, long_tokens=150, short_tokens=60, warmup_s=2.0,
                after_s=3.0, grace_s=20.0, sigstop_s=10.0, etcd_down_s=2.0, quorum_loss_s=5.0,
                scale_for_s=10.0, nonreaders=20, nonreader_baseline_s=4.0, nonreader_for_s=6.0,
                nonreader_after_s=2.0)
