"""Builds the operator's view of the mesh from a MeshView. Plain functions, no gRPC."""

from __future__ import annotations

from meshserve.v1 import controlplane_pb2

from services.common.membership import MeshView


def server_status(view: MeshView, server_id: str) -> controlplane_pb2.ServerStatus | None:
    info = view.servers.get(server_id)
    if info is None:
        return None
    draining = view.is_draining(server_id)
    # Until active health checks land, a live lease is the serving verdict.
    state = (controlplane_pb2.SERVING_STATE_DRAINING if draining
             else controlplane_pb2.SERVING_STATE_SERVING)
    return controlplane_pb2.ServerStatus(info=info, state=state, draining=draining)


def list_servers(view: MeshView, region: str = "", model: str = "") -> list[controlplane_pb2.ServerStatus]:
    out = []
    for sid in sorted(view.servers):
        info = view.servers[sid]
        if region and info.region != region:
            continue
        if model and model not in info.models:
            continue
        status = server_status(view, sid)
        if status is not None:
            out.append(status)
    return out


def cluster_status(view: MeshView, replica_id: str) -> controlplane_pb2.GetClusterStatusResponse:
    resp = controlplane_pb2.GetClusterStatusResponse(controlplane_id=replica_id)
    resp.servers.extend(list_servers(view))
    resp.routers.extend(view.routers[r] for r in sorted(view.routers))
    resp.controlplanes.extend(view.controlplanes[c] for c in sorted(view.controlplanes))
    for model, servers in view.ready_by_model().items():
        resp.model_replicas[model] = len(servers)
    return resp
