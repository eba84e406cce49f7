"""The leader's autoscaler on a real etcd, with the signals of servers and routers faked and a
fake clock: decisions are written fenced and followed by the plan, the rate history is kept in
etcd segments, and a new leader continues from the stored state (desired replicas, cooldowns,
history) instead of starting over."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import modelserver_pb2 as ms

from services.common import keyspace
from services.common.etcd_client import EtcdClient
from services.common.membership import MeshView
from services.controlplane.autoscaler.autoscaler import Autoscaler
from services.controlplane.autoscaler.signals import Demand, Snapshot
from services.controlplane.desired import plan_for
from services.controlplane.election import Election
from tests.helpers import EtcdCluster, until

pytestmark = pytest.mark.e2e

MODEL = "echo"
SERVERS = ("s0", "s1", "s2", "s3")


@dataclass
class FakeFeed:
    """What servers and routers would report: `in_flight` requests spread over the ready replicas."""

    in_flight: int = 0
    arrivals: int = 0
    waiting: int = 0
    on_waiting: object = None
    view: MeshView | None = None

    def snapshot(self) -> Snapshot:
        ready = [s for (s, m) in self.view.statuses if m == MODEL] if self.view else []
        share = self.in_flight // max(1, len(ready))
        loads = {sid: ms.LoadReport(server_id=sid, models=[ms.ModelLoad(
            model=MODEL, running=share, max_running=10)]) for sid in ready}
        return Snapshot(loads=loads, demand={MODEL: Demand(waiting_for_replica=self.waiting)},
                        arrivals={MODEL: self.arrivals})


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def seed(client: EtcdClient) -> None:
    for sid in SERVERS:
        await client.put(keyspace.server_key(sid), keyspace.encode(ms.ServerInfo(
            server_id=sid, address="127.0.0.1:1", region="local", zone=f"z{sid[-1]}")))
    await client.put(keyspace.model_key(MODEL), keyspace.encode(cp.ModelSpec(
        name=MODEL, backend="sim", replicas=1, generation=1)))
    await client.put(keyspace.autoscale_policy_key(MODEL), keyspace.encode(asp.AutoscalePolicy(
        model=MODEL, enabled=True, min_replicas=1, max_replicas=4, stable_window_s=10,
        scale_down_cooldown_s=5, predictive=True, bucket_s=1, season_s=4)))


async def mark_ready(client: EtcdClient, view: MeshView, replicas: dict[str, int]) -> None:
    """Servers report READY wherever the plan places the model (as model servers would), and
    this view has seen it before the next tick."""
    placed = plan_for(view, replicas=replicas).placements.get(MODEL, set())
    for sid in placed - {s for (s, m) in view.statuses if m == MODEL}:
        await client.put(keyspace.status_key(sid, MODEL), keyspace.encode(cp.ModelStatus(
            server_id=sid, model=MODEL, state=cp.MODEL_STATE_READY, managed=True)))
    await until(lambda: placed <= {s for (s, m) in view.statuses if m == MODEL},
                what="statuses in the view")


async def leader(client: EtcdClient, name: str, clock: Clock, feed: FakeFeed):
    view = MeshView(client)
    await view.start()
    election = Election(client, name, "127.0.0.1:1", ttl=2)
    election.start()
    await until(lambda: election.is_leader, what=f"{name} to lead")
    feed.view = view
    return view, election, Autoscaler(client, view, election, name, feed, clock=clock)  # type: ignore[arg-type]


async def tick(scaler: Autoscaler, clock: Clock, client: EtcdClient, view: MeshView,
               feed: FakeFeed, n: int = 1) -> None:
    for _ in range(n):
        clock.t += 1.0
        await scaler.step()
        await mark_ready(client, view, scaler.replicas())


async def test_decisions_persist_and_a_new_leader_continues(etcd: EtcdCluster):
    client = EtcdClient(etcd.endpoints)
    await seed(client)
    clock, feed = Clock(), FakeFeed(arrivals=5)
    view, election, scaler = await leader(client, "cp-a", clock, feed)
    await tick(scaler, clock, client, view, feed)
    assert scaler.replicas() == {MODEL: 1}
    feed.in_flight = 20  # 20 in flight, target 7 per replica: three replicas
    await tick(scaler, clock, client, view, feed, 2)
    assert scaler.replicas()[MODEL] == 3
    await until(lambda: MODEL in view.autoscale_states
                and view.autoscale_states[MODEL].desired_replicas == 3, what="state in etcd")
    stored = view.autoscale_states[MODEL]
    assert stored.decided_by == "cp-a" and stored.last_scale_up_ms and "in flight" in stored.reason
    assert len(plan_for(view).placements[MODEL]) == 3  # any replica plans with the decision
    await tick(scaler, clock, client, view, feed, 12)  # buckets close and are written
    history, _ = await client.get_prefix(keyspace.history_prefix(MODEL))
    assert history, "the rate history is kept in etcd"

    # The leader goes; another takes over from what etcd holds.
    await election.stop()
    view2, election2, scaler2 = await leader(client, "cp-b", clock, feed)
    await until(lambda: view2.autoscale_states.get(MODEL) is not None, what="view of the state")
    before = view2.autoscale_states[MODEL].desired_replicas
    assert before == 3
    feed.in_flight = 0  # load is gone just as the leader changes
    await tick(scaler2, clock, client, view2, feed, 5)
    track = scaler2.tracks[MODEL]
    assert track.state.desired_replicas == before  # no drop: scale-down waits for its own window
    assert track.state.last_scale_up_ms == stored.last_scale_up_ms
    assert track.history.measured() >= 10  # the history came back from etcd
    await tick(scaler2, clock, client, view2, feed, 12)
    assert track.state.desired_replicas < before  # and then it does scale down
    for e, v in ((election2, view2), (election, view)):
        await e.stop()
        await v.stop()
    await client.close()


async def test_requests_waiting_at_zero_wake_the_leader(etcd: EtcdCluster):
    client = EtcdClient(etcd.endpoints)
    await seed(client)
    await client.put(keyspace.autoscale_policy_key(MODEL), keyspace.encode(asp.AutoscalePolicy(
        model=MODEL, enabled=True, min_replicas=0, max_replicas=2, scale_to_zero=True,
        stable_window_s=10, zero_grace_s=3)))
    clock, feed = Clock(), FakeFeed()
    view, election, scaler = await leader(client, "cp-a", clock, feed)
    woken = asyncio.Event()
    scaler.wake = woken.set
    await tick(scaler, clock, client, view, feed, 6)
    assert scaler.replicas()[MODEL] == 0
    feed.waiting = 2
    scaler.urgent()  # what the signal feed calls when a router reports waiting requests
    assert woken.is_set()
    await scaler.step()  # at once, not a tick later
    assert scaler.replicas()[MODEL] == 1
    assert scaler.tracks[MODEL].last is not None and scaler.tracks[MODEL].last.code == "activation"
    await election.stop()
    await view.stop()
    await client.close()
