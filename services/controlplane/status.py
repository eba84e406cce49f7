"""Builds the operator's view of the mesh from a MeshView. Plain functions, no gRPC."""

from __future__ import annotations

from collections.abc import Mapping

from meshserve.v1 import controlplane_pb2 as cp

from services.common.membership import MeshView


def server_status(view: MeshView, server_id: str) -> cp.ServerStatus | None:
    info = view.servers.get(server_id)
    if info is None:
        return None
    draining = view.is_draining(server_id)
    verdict = view.health.get(server_id)
    state = cp.SERVING_STATE_DRAINING if draining else cp.ServingState.ValueType(view.verdict(server_id))
    out = cp.ServerStatus(info=info, state=state, draining=draining,
                          health_reason=verdict.reason if verdict is not None else "")
    out.models.extend(st for (s, _), st in sorted(view.statuses.items()) if s == server_id)
    return out


def list_servers(view: MeshView, region: str = "", model: str = "",
                 labels: Mapping[str, str] | None = None) -> list[cp.ServerStatus]:
    out = []
    for sid in sorted(view.servers):
        info = view.servers[sid]
        if region and info.region != region:
            continue
        if model and (sid, model) not in view.statuses:
            continue
        if labels and any(info.labels.get(k) != v for k, v in labels.items()):
            continue
        status = server_status(view, sid)
        if status is not None:
            out.append(status)
    return out


def placements(view: MeshView, model: str = "") -> list[cp.PlacementStatus]:
    # Pinned models, and failed loads the leader already moved elsewhere: the server keeps that
    # report for its back-off period, and the operator should see where and why it failed.
    pairs = set(view.placements) | {p for p, st in view.statuses.items()
                                    if not st.managed or st.state == cp.MODEL_STATE_FAILED}
    out = []
    for sid, m in sorted(pairs):
        if model and m != model:
            continue
        st = view.statuses.get((sid, m))
        info = view.servers.get(sid)
        out.append(cp.PlacementStatus(
            server_id=sid, model=m, state=st.state if st else cp.MODEL_STATE_UNSPECIFIED,
            reason=st.reason if st else "", region=info.region if info else "",
            zone=info.zone if info else "", managed=st.managed if st else True))
    return out


def cluster_status(view: MeshView, replica_id: str, leader: cp.LeaderRecord | None,
                   problem: str) -> cp.GetClusterStatusResponse:
    """`leader` and `problem` come from a linearizable read (quorum.read_leader): with a
    problem the answer is degraded and names no leader rather than a possibly stale one."""
    if not problem and not view.connected:
        problem = "this replica's watches on etcd are broken; showing the last known state"
    resp = cp.GetClusterStatusResponse(controlplane_id=replica_id, degraded=bool(problem),
                                       degraded_reason=problem)
    resp.servers.extend(list_servers(view))
    resp.routers.extend(view.routers[r] for r in sorted(view.routers))
    resp.controlplanes.extend(view.controlplanes[c] for c in sorted(view.controlplanes))
    for model, servers in view.ready_by_model().items():
        resp.model_replicas[model] = len(servers)
    if leader is not None and not problem:
        resp.leader.CopyFrom(leader)
    return resp
