"""Envoy's ext_authz (HTTP) check, served by every router: is this API key valid, and whose.

Why in the router and why HTTP: routers already mirror etcd, so the key set (tenants and key
hashes under /meshserve/auth/) is local and a check costs a dict lookup and one SHA-256, with no
extra process or hop to fail; Envoy's HTTP ext_authz needs no Envoy protobuf stubs in Python,
and on a denial Envoy answers the client with our status and JSON body (401), which gRPC clients
see as UNAUTHENTICATED. A Lua filter with a pushed key set would need Envoy reconfigured on every
key change. The listener is mTLS (only Envoy's certificate is answered), reloaded on rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl

from aiohttp import web
from prometheus_client import Counter

from services.common.auth_records import KeySet, key_from_headers
from services.common.certs import Identity
from services.common.tls import TlsFiles

from .access import HOW_TO_AUTHENTICATE, TENANT_HEADER

log = logging.getLogger(__name__)

CHECKS = Counter("meshserve_router_edge_auth_total", "Edge API-key checks answered for Envoy",
                 ["outcome"])
JWT_TENANT_HEADER = "x-meshserve-jwt-tenant"
for _outcome in ("ok", "ok_jwt", "unauthenticated", "refused_peer"):
    CHECKS.labels(_outcome)

UNAUTHENTICATED_BODY = json.dumps({"error": {
    "code": 16, "status": "UNAUTHENTICATED", "type": "authentication_error",
    "message": "invalid or missing API key; " + HOW_TO_AUTHENTICATE}})


def _peer_is_envoy(request: web.Request) -> bool:
    if request.transport is None:
        return False
    cert = request.transport.get_extra_info("peercert") or {}
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    return any((i := Identity.parse(u)) is not None and i.kind == "envoy" for u in uris)


class EdgeAuthz:
    def __init__(self, keys: KeySet, listen: str, tls: TlsFiles | None) -> None:
        self.keys = keys
        self.listen = listen
        self.tls = tls
        self._runner: web.AppRunner | None = None
        self._reload: asyncio.Task | None = None
        self._ssl: ssl.SSLContext | None = None

    async def check(self, request: web.Request) -> web.Response:
        if self.tls is not None and not _peer_is_envoy(request):
            CHECKS.labels("refused_peer").inc()
            return web.Response(status=403, text="only Envoy asks this service")
        headers = {k.lower(): v for k, v in request.headers.items()}
        # Set only by Envoy's jwt_authn from a verified token (the client's copy is removed first).
        claimed = headers.get(JWT_TENANT_HEADER, "")
        tenant: str | None
        if claimed:
            tenant = claimed if claimed in self.keys.tenants else None
            outcome = "ok_jwt" if tenant else "unauthenticated"
        else:
            tenant = self.keys.authenticate(key_from_headers(headers))
            outcome = "ok" if tenant else "unauthenticated"
        if tenant is None:
            CHECKS.labels("unauthenticated").inc()
            return web.Response(status=401, text=UNAUTHENTICATED_BODY, content_type="application/json",
                                headers={"www-authenticate": 'Bearer realm="meshserve"'})
        CHECKS.labels(outcome).inc()
        return web.Response(status=200, headers={TENANT_HEADER: tenant})

    def _context(self, files: TlsFiles) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(files.ca))
        ctx.load_cert_chain(str(files.cert), str(files.key))
        return ctx

    async def _follow_rotation(self, files: TlsFiles) -> None:
        """New handshakes use a certificate replaced on disk (loaded into the same context)."""
        stamp = files.stamp()
        while True:
            await asyncio.sleep(2.0)
            try:
                now = files.stamp()
                if now != stamp and self._ssl is not None:
                    self._ssl.load_cert_chain(str(files.cert), str(files.key))
                    stamp = now
                    log.info("edge authz: TLS certificate reloaded")
            except (OSError, ssl.SSLError) as exc:
                log.warning("edge authz: TLS files not reloaded (%s)", exc)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.check)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = self.listen.rpartition(":")
        if self.tls is not None:
            self._ssl = self._context(self.tls)
            self._reload = asyncio.create_task(self._follow_rotation(self.tls), name="authz-tls")
        # Envoy holds keep-alive connections; a stopping router waits at most a second for them.
        await web.TCPSite(self._runner, host, int(port), ssl_context=self._ssl,
                          shutdown_timeout=1.0).start()
        log.info("edge authz (ext_authz for Envoy) on %s", self.listen)

    async def stop(self) -> None:
        if self._reload is not None:
            self._reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload
        if self._runner is not None:
            await self._runner.cleanup()
