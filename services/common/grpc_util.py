"""What every MeshServe gRPC server and channel shares: health, reflection, limits, error mapping
and credentials.

This is the one place that makes gRPC credentials. A process states its TLS identity once
(`configure_tls`, from `--tls-dir` / `--insecure-dev`); every listener it binds then requires a
client certificate signed by the mesh CA, and every channel it opens presents its own. Server
credentials are dynamic: gRPC asks `_ServerCertificates` before each new handshake, which
re-reads the files when they changed, so a rotated certificate is served without a restart.
Channels read the files when they are made, so new channels use a rotated certificate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import PermissionDenied
from .ports import PortInUseError, check_port_free
from .status_interceptor import StatusInterceptor
from .tls import TlsFiles, describe_peer, peer_identity

log = logging.getLogger(__name__)

__all__ = ["CHANNEL_OPTIONS", "FLOW_CONTROL_OPTIONS", "SERVER_OPTIONS", "PortInUseError", "aio_channel",
           "bind", "channel", "channel_credentials", "check_port_free", "configure_tls",
           "current_tls", "new_server", "set_serving"]

#: This process's TLS identity; None = plaintext (--insecure-dev, or a unit test's own servers).
_tls: TlsFiles | None = None


def configure_tls(files: TlsFiles | None) -> None:
    """Set the process's identity before it binds or dials anything (meshserve.py does)."""
    global _tls
    _tls = files


def current_tls() -> TlsFiles | None:
    return _tls

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


def new_server(service_names: Iterable[str], interceptors: Iterable[grpc.aio.ServerInterceptor] = ()
               ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with grpc.health.v1 and reflection already registered, and the one
    error-to-status mapping (status_interceptor.py) in front of every servicer and of
    `interceptors` (which may raise the errors of errors.py like a servicer)."""
    server = grpc.aio.server(options=SERVER_OPTIONS,
                             interceptors=[StatusInterceptor(), *interceptors])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names) + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                   reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


class _ServerCertificates:
    """gRPC's certificate-config fetcher: a new config when the files changed, else None."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.stamp = files.stamp()

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return self._config()

    def _config(self) -> grpc.ServerCertificateConfiguration:
        ca, cert, key = self.files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self.files.stamp()
            if stamp == self.stamp:
                return None
            config = self._config()
        except (OSError, ValueError) as exc:  # mid-rotation: keep serving the last good files
            log.warning("TLS files not reloaded (%s); still serving the previous certificate", exc)
            return None
        self.stamp = stamp
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return config


def require_peer(context: grpc.aio.ServicerContext, kinds: frozenset[str], what: str) -> None:
    """PermissionDenied unless the caller's certificate names one of `kinds` (mesh identity
    kinds, certs.KINDS); nothing is checked in a plaintext process (--insecure-dev)."""
    if _tls is None:
        return
    ident = peer_identity(context)
    if ident is None or ident.kind not in kinds:
        raise PermissionDenied(f"{what} answers only {', '.join(sorted(kinds))} identities; the caller "
                               f"is {describe_peer(context)}")


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """mTLS: a client certificate signed by the mesh CA is required; reloaded on change."""
    fetcher = _ServerCertificates(files)
    return grpc.dynamic_ssl_server_credentials(fetcher.initial(), fetcher,
                                               require_client_authentication=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def aio_channel(target: str, options: list[tuple[str, object]] | None = None,
                tls: TlsFiles | None | bool = True) -> grpc.aio.Channel:
    """An asyncio channel with this process's identity (`tls=True`), given files, or plaintext
    (`tls=None`: only for the public edge, which is plaintext by configuration)."""
    files = _tls if tls is True else (tls or None)
    opts = list(CHANNEL_OPTIONS if options is None else options)
    if files is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, channel_credentials(files), options=opts)


def channel(target: str, options: list[tuple[str, object]] | None = None,
            tls: TlsFiles | None | bool = True) -> grpc.Channel:
    """The blocking twin of aio_channel (CLIs, readiness checks)."""
    files = _tls if tls is True else (tls or None)
    opts = list(CHANNEL_OPTIONS if options is None else options)
    if files is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, channel_credentials(files), options=opts)


def bind(server: grpc.aio.Server, address: str) -> int:
    """Bind a port (mTLS when the process has an identity), refusing loudly when another
    listener has it (gRPC itself would share it or fail with a vague message); TIME_WAIT
    leftovers of a previous run do not count."""
    host, _, port = address.rpartition(":")
    if int(port) != 0:
        check_port_free(host.strip("[]") or "0.0.0.0", int(port))
    if _tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, server_credentials(_tls))
    if bound == 0:
        raise PortInUseError(f"could not bind {address}")
    return bound


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str],
                      serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in names:
        await health_servicer.set(name, status)
