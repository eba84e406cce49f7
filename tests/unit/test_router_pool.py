"""The router's pool: replicas per (server, model), per-replica load and labels, and liveness -
attempts move at once when a server hangs, leaves or is marked NOT_SERVING (no sockets: the
links' channels point nowhere and reports are fed by hand)."""

from __future__ import annotations

import asyncio

from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import modelserver_pb2

from services.router.pool import BackendPool
from services.router.replica import AttemptHandle
from tests.helpers import until


class FakeView:
    def __init__(self) -> None:
        self.servers: dict[str, modelserver_pb2.ServerInfo] = {}
        self.statuses: dict[tuple[str, str], cp.ModelStatus] = {}
        self.health: dict[str, int] = {}
        self.drains: set[str] = set()
        self.routing_policy = None
        self._listeners: list = []

    def subscribe(self, listener) -> None:
        self._listeners.append(listener)

    def changed(self) -> None:
        for listener in self._listeners:
            listener()

    def verdict(self, sid: str) -> int:
        return self.health.get(sid, cp.SERVING_STATE_SERVING)

    def is_draining(self, sid: str) -> bool:
        return sid in self.drains

    def serving(self, sid: str) -> bool:
        return sid in self.servers and sid not in self.drains and self.verdict(sid) != cp.SERVING_STATE_NOT_SERVING

    def known_models(self) -> set[str]:
        return {m for (_, m) in self.statuses}

    def add(self, sid: str, started: int = 1, **models: str) -> None:
        self.servers[sid] = modelserver_pb2.ServerInfo(server_id=sid, address="127.0.0.1:9", region="r",
                                                       started_at_ms=started)
        for model, backend in models.items():
            self.statuses[(sid, model)] = cp.ModelStatus(server_id=sid, model=model, state=cp.MODEL_STATE_READY,
                                                         backend=backend, simulated=backend == "sim")
        self.changed()


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def report(**models: tuple[int, int]) -> modelserver_pb2.LoadReport:
    return modelserver_pb2.LoadReport(models=[modelserver_pb2.ModelLoad(model=m, running=r, max_running=mx)
                                              for m, (r, mx) in models.items()])


async def test_replicas_are_per_model_with_their_own_load_and_labels():
    view = FakeView()
    pool = BackendPool(view)  # type: ignore[arg-type]
    try:
        view.add("s1", chat="torch", echo="sim")
        view.add("s2", chat="torch")
        assert [r.replica_id for r in pool.candidates("chat")] == ["s1/chat", "s2/chat"]
        echo = pool.candidates("echo")[0]
        chat = pool.candidates("chat")[0]
        assert (echo.backend, echo.simulated) == ("sim", True)
        assert (chat.backend, chat.simulated) == ("torch", False)
        pool.links["s1"].on_report(report(echo=(10, 10), chat=(0, 8)), now=0.0)
        assert echo.load().utilization == 1.0  # the sim model is saturated ...
        assert chat.load().utilization == 0.0 and chat.load().max_running == 8  # ... the real one is not
        unknown = modelserver_pb2.LoadReport(models=[modelserver_pb2.ModelLoad(model="chat", unknown=True,
                                                                               max_running=4)])
        pool.links["s1"].on_report(unknown, now=0.0)
        chat.outstanding = 3
        assert chat.load().in_flight == 3 and chat.load().max_running == 4  # only what we sent
    finally:
        await pool.close()


async def test_a_silent_server_is_hung_its_attempts_move_and_a_report_brings_it_back():
    view = FakeView()
    pool = BackendPool(view, hang_timeout_s=0.3)  # type: ignore[arg-type]
    try:
        view.add("s1", chat="torch")
        link = pool.links["s1"]
        handle = AttemptHandle(FakeCall())
        link.attempts.add(handle)
        replica = pool.candidates("chat")[0]
        assert not replica.ejected(0.0)
        await until(lambda: handle.call.cancelled, 5, "the hung server's attempt abandoned")
        assert "hung" in handle.cause and link.hung and replica.ejected(0.0)
        link.on_report(report(chat=(0, 4)), now=asyncio.get_running_loop().time())
        assert not link.hung and not replica.ejected(0.0)
    finally:
        await pool.close()


async def test_leaving_or_not_serving_moves_attempts_at_once_draining_does_not():
    view = FakeView()
    pool = BackendPool(view)  # type: ignore[arg-type]
    left: list[str] = []
    pool.on_leave(left.append)
    try:
        view.add("s1", chat="torch", echo="sim")
        view.add("s2", chat="torch")
        view.add("s3", chat="torch")
        handles = {sid: AttemptHandle(FakeCall()) for sid in ("s1", "s2", "s3")}
        for sid, h in handles.items():
            pool.links[sid].attempts.add(h)
        view.drains.add("s3")
        view.changed()
        assert not handles["s3"].call.cancelled  # in-flight requests finish on a draining server
        assert [r.server_id for r in pool.candidates("chat")] == ["s1", "s2"]
        view.health["s2"] = cp.SERVING_STATE_NOT_SERVING
        view.changed()
        assert handles["s2"].call.cancelled and "NOT_SERVING" in handles["s2"].cause
        del view.servers["s1"]
        view.changed()
        assert handles["s1"].call.cancelled and "left the mesh" in handles["s1"].cause
        assert sorted(left) == ["s1/chat", "s1/echo"]
        del view.statuses[("s3", "chat")]  # a released model: its attempts finish, it takes no more
        view.changed()
        assert not handles["s3"].call.cancelled and "s3" not in {r.server_id for r in pool.candidates("chat")}
    finally:
        await pool.close()


async def test_a_server_whose_lease_expired_but_still_reports_lingers_until_it_registers_again():
    """An etcd outage longer than a lease: every lease expires at once when quorum returns. The
    servers are alive (they report) and register again within seconds; meanwhile routers keep
    their replicas, so no request finds the model gone."""
    view = FakeView()
    pool = BackendPool(view, hang_timeout_s=0.5, linger_s=30)  # type: ignore[arg-type]
    try:
        view.add("s1", chat="torch")
        link = pool.links["s1"]
        link.on_report(report(chat=(0, 4)), now=asyncio.get_running_loop().time())
        handle = AttemptHandle(FakeCall())
        link.attempts.add(handle)
        del view.servers["s1"], view.statuses[("s1", "chat")]
        view.changed()
        assert not handle.call.cancelled and link.orphaned_since is not None
        assert [r.replica_id for r in pool.candidates("chat")] == ["s1/chat"] and "chat" in pool.known_models()
        view.add("s1", chat="torch")  # registered again
        assert link.orphaned_since is None and pool.links["s1"] is link
        # Gone for real: it left membership and its reports stopped too.
        del view.servers["s1"], view.statuses[("s1", "chat")]
        view.changed()
        await until(lambda: "s1" not in pool.links, 5, "the silent orphan dropped")
        assert handle.call.cancelled and pool.candidates("chat") == []
    finally:
        await pool.close()


async def test_a_restarted_server_starts_with_a_clean_slate():
    view = FakeView()
    pool = BackendPool(view)  # type: ignore[arg-type]
    try:
        view.add("s1", chat="torch")
        old = pool.candidates("chat")[0]
        for _ in range(3):
            old.record_failure()
        assert old.ejected(asyncio.get_running_loop().time())
        view.add("s1", started=2, chat="torch")  # a new process on the same address
        new = pool.candidates("chat")[0]
        assert new is not old and not new.ejected(asyncio.get_running_loop().time())
    finally:
        await pool.close()
