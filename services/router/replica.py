"""What one router knows of each model server (a link) and each model on it (a replica).

The replica - (server, model) - is the data plane's unit: it is what policies score, admission
saturates, outlier detection ejects, the prefix record keys and answers are labelled with. The
server link holds what replicas on one server share: the channel, the load stream (whose silence
means a hung server) and the attempts in flight there, so they can be abandoned at once when the
server hangs, leaves or is marked NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from .policy.types import Load

log = logging.getLogger(__name__)

EJECT_AFTER_FAILURES = 3
EJECT_SECONDS = 5.0


class AttemptHandle:
    """One upstream call in flight; `abort` abandons it and says why (the dispatcher then
    retries or migrates instead of taking the cancellation for the client's)."""

    def __init__(self, call: grpc.aio.Call) -> None:
        self.call = call
        self.cause = ""

    def abort(self, cause: str) -> None:
        if not self.cause:
            self.cause = cause
        self.call.cancel()


@dataclass
class ServerLink:
    """One model server: its channel, its load stream and the attempts in flight on it."""

    info: modelserver_pb2.ServerInfo
    channel: grpc.aio.Channel
    stub: modelserver_pb2_grpc.ModelServerServiceStub
    replicas: dict[str, Replica] = field(default_factory=dict)
    #: Latest per-model figures, kept even for models not READY yet (a replica appearing later).
    loads: dict[str, modelserver_pb2.ModelLoad] = field(default_factory=dict)
    last_report_at: float = field(default_factory=time.monotonic)
    reported: bool = False  # its load stream is up and has delivered a report
    hung: bool = False
    #: When its membership record vanished while it kept reporting (see BackendPool: lingering).
    orphaned_since: float | None = None
    attempts: set[AttemptHandle] = field(default_factory=set)
    load_task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def server_id(self) -> str:
        return self.info.server_id

    def on_report(self, report: modelserver_pb2.LoadReport, now: float) -> None:
        self.last_report_at = now
        self.reported = True
        self.hung = False
        self.loads = {m.model: m for m in report.models}
        for model, replica in self.replicas.items():
            replica.set_report(self.loads.get(model))

    def lost_reports(self) -> None:
        """The load stream broke: figures are unknown until it is back (silence is judged apart)."""
        self.loads = {}
        self.reported = False
        for replica in self.replicas.values():
            replica.set_report(None)

    def abort_attempts(self, cause: str) -> int:
        attempts = list(self.attempts)
        for attempt in attempts:
            attempt.abort(cause)
        return len(attempts)

    def reporting(self, now: float, within_s: float) -> bool:
        """Its load stream is alive: the process is up and answering, whatever etcd says."""
        return self.reported and not self.hung and now - self.last_report_at <= within_s

    def channel_ready(self) -> bool:
        return self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY


@dataclass
class Replica:
    """One model on one server, as this router sees it."""

    link: ServerLink
    model: str
    backend: str = ""
    simulated: bool = False
    outstanding: int = 0
    report: modelserver_pb2.ModelLoad | None = None
    outstanding_at_report: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    replica_id: str = ""

    def __post_init__(self) -> None:
        self.replica_id = f"{self.link.server_id}/{self.model}"
        self.set_report(self.link.loads.get(self.model))

    @property
    def server_id(self) -> str:
        return self.link.server_id

    @property
    def region(self) -> str:
        return self.link.info.region

    @property
    def zone(self) -> str:
        return self.link.info.zone

    def set_report(self, report: modelserver_pb2.ModelLoad | None) -> None:
        self.report = report
        self.outstanding_at_report = self.outstanding

    def load(self) -> Load:
        """The replica's report plus what this router sent since (reports lag by up to an
        interval; a burst must not all land on the replica that looked idle), and never less than
        this router's own outstanding requests. A backend that cannot report counts only those."""
        r = self.report
        if r is None or r.unknown:
            return Load(in_flight=self.outstanding, max_running=r.max_running if r is not None else 0)
        reported = r.running + r.queue_depth
        since = max(0, self.outstanding - self.outstanding_at_report)
        return Load(in_flight=max(reported + since, self.outstanding), queue_depth=r.queue_depth,
                    max_running=r.max_running, kv_blocks_used=r.kv_blocks_used,
                    kv_blocks_total=r.kv_blocks_total)

    def ejected(self, now: float) -> bool:
        """Skipped unless nothing else is left: it kept failing, or its server went silent."""
        return self.link.hung or now < self.ejected_until

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        """Outlier detection: a replica that keeps failing is skipped for a while."""
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER_FAILURES:
            self.ejected_until = time.monotonic() + EJECT_SECONDS
            log.warning("ejecting %s for %.0fs after %d failures", self.replica_id, EJECT_SECONDS,
                        self.consecutive_failures)
