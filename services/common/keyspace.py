"""The one module that owns every etcd key and the protobuf type stored under it.

Layout (values are binary protobuf, never ad-hoc JSON):

    /meshserve/servers/<server-id>      ServerInfo      on the server's lease
    /meshserve/routers/<router-id>      ReplicaInfo     on the router's lease
    /meshserve/controlplanes/<id>       ReplicaInfo     on the replica's lease
    /meshserve/drain/<server-id>        DrainRecord     operator intent, survives restarts
    /meshserve/models/<model>           ModelSpec       desired state, written on deploy
    /meshserve/placement/<server>/<m>   Placement       the leader's decision
    /meshserve/status/<server>/<m>      ModelStatus     on the server's lease
    /meshserve/health/<server-id>       HealthVerdict   the leader's health checker
    /meshserve/settings/routing         RoutingPolicy   managed by the control plane
    /meshserve/election/controlplane    LeaderRecord    on the leader's lease
    /meshserve/loadfailures/<model>     LoadFailures    the leader's, fenced; halts placement
    /meshserve/autoscale/policies/<m>   AutoscalePolicy operator intent (meshctl autoscale set)
    /meshserve/autoscale/state/<m>      AutoscaleState  the leader's decision, fenced
    /meshserve/autoscale/history/<m>/<n> RateHistory    the leader's, fenced; request-rate history
    /meshserve/settings/budgets         ScalingBudgets  region/zone caps scaling never crosses
    /meshserve/traffic/policies/<name>  TrafficPolicy   operator intent (meshctl traffic)
    /meshserve/traffic/canary/<name>    CanaryState     the leader's canary steps, fenced
    /meshserve/traffic/stats/<name>/<router>  TrafficStats  a router's canary window, on its lease
    /meshserve/traffic/guard            (empty)         rewritten with every policy write

Ids and model names follow services/common/names.py; keys are built only from valid ones.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from meshserve.v1 import autoscale_pb2, controlplane_pb2, modelserver_pb2, traffic_pb2

from . import names

ROOT = "/meshserve/"
SERVERS = ROOT + "servers/"
ROUTERS = ROOT + "routers/"
CONTROLPLANES = ROOT + "controlplanes/"
GATEWAYS = ROOT + "gateways/"
DRAIN = ROOT + "drain/"
MODELS = ROOT + "models/"
PLACEMENT = ROOT + "placement/"
STATUS = ROOT + "status/"
HEALTH = ROOT + "health/"
ROUTING_POLICY = ROOT + "settings/routing"
ELECTION = ROOT + "election/controlplane"
LOAD_FAILURES = ROOT + "loadfailures/"
AUTOSCALE_POLICIES = ROOT + "autoscale/policies/"
AUTOSCALE_STATE = ROOT + "autoscale/state/"
AUTOSCALE_HISTORY = ROOT + "autoscale/history/"
SCALING_BUDGETS = ROOT + "settings/budgets"
TRAFFIC_POLICIES = ROOT + "traffic/policies/"
CANARY_STATES = ROOT + "traffic/canary/"
TRAFFIC_STATS = ROOT + "traffic/stats/"
#: Every policy write compares and rewrites this key, so two writers that each checked the graph
#: (cycles, references) against what they read cannot both commit.
TRAFFIC_GUARD = ROOT + "traffic/guard"
JOBWORKERS = ROOT + "jobworkers/"

M = TypeVar("M", bound=Message)


def _check_id(kind: str, ident: str) -> str:
    if kind == "model":
        return names.check_model_name(ident)
    return names.check_name(f"{kind} id", ident)


def server_key(server_id: str) -> str:
    return SERVERS + _check_id("server", server_id)


def router_key(router_id: str) -> str:
    return ROUTERS + _check_id("router", router_id)


def jobworker_key(worker_id: str) -> str:
    return JOBWORKERS + _check_id("job worker", worker_id)


def controlplane_key(replica_id: str) -> str:
    return CONTROLPLANES + _check_id("control-plane", replica_id)


def gateway_key(gateway_id: str) -> str:
    return GATEWAYS + _check_id("gateway", gateway_id)


def drain_key(server_id: str) -> str:
    return DRAIN + _check_id("server", server_id)


def model_key(model: str) -> str:
    return MODELS + _check_id("model", model)


def placement_prefix(server_id: str) -> str:
    return PLACEMENT + _check_id("server", server_id) + "/"


def placement_key(server_id: str, model: str) -> str:
    return placement_prefix(server_id) + _check_id("model", model)


def status_key(server_id: str, model: str) -> str:
    return STATUS + _check_id("server", server_id) + "/" + _check_id("model", model)


def health_key(server_id: str) -> str:
    return HEALTH + _check_id("server", server_id)


def load_failures_key(model: str) -> str:
    return LOAD_FAILURES + _check_id("model", model)


def autoscale_policy_key(model: str) -> str:
    return AUTOSCALE_POLICIES + _check_id("model", model)


def autoscale_state_key(model: str) -> str:
    return AUTOSCALE_STATE + _check_id("model", model)


def history_prefix(model: str) -> str:
    return AUTOSCALE_HISTORY + _check_id("model", model) + "/"


def history_key(model: str, segment: int) -> str:
    """Zero-padded so that keys sort in time order."""
    if segment < 0:
        raise ValueError(f"history segment {segment} is negative")
    return f"{history_prefix(model)}{segment:015d}"


def traffic_policy_key(name: str) -> str:
    return TRAFFIC_POLICIES + names.check_name("traffic policy name", name)


def canary_state_key(name: str) -> str:
    return CANARY_STATES + names.check_name("traffic policy name", name)


def traffic_stats_prefix(name: str) -> str:
    return TRAFFIC_STATS + names.check_name("traffic policy name", name) + "/"


def traffic_stats_key(name: str, router_id: str) -> str:
    return traffic_stats_prefix(name) + _check_id("router", router_id)


def pair_key(prefix: str, server_id: str, model: str) -> str:
    """The key of a (server, model) pair as read from etcd, unchecked: to delete a record whose
    ids break the naming rule (injected or written by an older version)."""
    return f"{prefix}{server_id}/{model}"


def split_pair(prefix: str, key: str) -> tuple[str, str]:
    """'<prefix><server>/<model>' -> (server, model)."""
    server, _, model = id_from_key(prefix, key).partition("/")
    return server, model


def id_from_key(prefix: str, key: str) -> str:
    """The last path element of a key under prefix."""
    if not key.startswith(prefix):
        raise ValueError(f"{key!r} is not under {prefix!r}")
    return key[len(prefix):]


def decode(cls: type[M], value: bytes) -> M | None:
    """Parse a stored value; a corrupt value is skipped (None), never fatal."""
    msg = cls()
    try:
        msg.ParseFromString(value)
    except (DecodeError, ValueError, TypeError):  # corrupt bytes, bad UTF-8, not bytes at all
        return None
    return msg


def encode(msg: Message) -> bytes:
    return msg.SerializeToString(deterministic=True)


# Which message each prefix holds; readers use this instead of guessing.
VALUE_TYPES: dict[str, type[Message]] = {
    SERVERS: modelserver_pb2.ServerInfo,
    ROUTERS: controlplane_pb2.ReplicaInfo,
    CONTROLPLANES: controlplane_pb2.ReplicaInfo,
    GATEWAYS: controlplane_pb2.ReplicaInfo,
    DRAIN: controlplane_pb2.DrainRecord,
    MODELS: controlplane_pb2.ModelSpec,
    PLACEMENT: controlplane_pb2.Placement,
    STATUS: controlplane_pb2.ModelStatus,
    HEALTH: controlplane_pb2.HealthVerdict,
    ROUTING_POLICY: controlplane_pb2.RoutingPolicy,
    ELECTION: controlplane_pb2.LeaderRecord,
    LOAD_FAILURES: controlplane_pb2.LoadFailures,
    AUTOSCALE_POLICIES: autoscale_pb2.AutoscalePolicy,
    AUTOSCALE_STATE: autoscale_pb2.AutoscaleState,
    AUTOSCALE_HISTORY: autoscale_pb2.RateHistory,
    SCALING_BUDGETS: autoscale_pb2.ScalingBudgets,
    TRAFFIC_POLICIES: traffic_pb2.TrafficPolicy,
    CANARY_STATES: traffic_pb2.CanaryState,
    TRAFFIC_STATS: traffic_pb2.TrafficStats,
    JOBWORKERS: controlplane_pb2.ReplicaInfo,
}
