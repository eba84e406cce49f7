"""What every MeshServe gRPC server shares: health, reflection, limits and error mapping."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .ports import PortInUseError, check_port_free
from .status_interceptor import StatusInterceptor

log = logging.getLogger(__name__)

__all__ = ["CHANNEL_OPTIONS", "FLOW_CONTROL_OPTIONS", "SERVER_OPTIONS", "PortInUseError", "bind",
           "check_port_free", "new_server", "set_serving"]

#: Largest request a server accepts (an oversize request gets RESOURCE_EXHAUSTED from gRPC itself,
#: and the services reject prompts above their own character limit with INVALID_ARGUMENT).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

#: Flow control. gRPC's BDP probing grows a stream's receive window to megabytes (up to 1 GiB)
#: whenever data flows fast, so a router whose client stopped reading kept accepting ~5 MB per
#: stream from the model server. With probing off the window stays at STREAM_WINDOW_BYTES: a
#: sender's `yield` / write then blocks once that much is unread, which is the backpressure that
#: pauses a generation. 64 KiB holds hundreds of token chunks and still moves an 8 MiB request
#: at hundreds of MB/s over a LAN round trip.
STREAM_WINDOW_BYTES = 64 * 1024
FLOW_CONTROL_OPTIONS = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
]

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    *FLOW_CONTROL_OPTIONS,
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),  # the router does its own retries
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    *FLOW_CONTROL_OPTIONS,
]


def new_server(service_names: Iterable[str]) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with grpc.health.v1 and reflection already registered, and the one
    error-to-status mapping (status_interceptor.py) in front of every servicer."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[StatusInterceptor()])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names) + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                   reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


def bind(server: grpc.aio.Server, address: str) -> int:
    """Bind an insecure port, refusing loudly when another listener has it (gRPC itself would
    share it or fail with a vague message); TIME_WAIT leftovers of a previous run do not count."""
    host, _, port = address.rpartition(":")
    if int(port) != 0:
        check_port_free(host.strip("[]") or "0.0.0.0", int(port))
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise PortInUseError(f"could not bind {address}")
    return bound


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str],
                      serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in names:
        await health_servicer.set(name, status)
