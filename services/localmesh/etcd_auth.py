"""Turn on etcd's auth for a secure local mesh: a user and a role per component (etcd_roles.py),
then `auth enable`. Run as `root` (a certificate with CN root) after etcd is healthy and before
any service starts; every step tolerates having been done already, so a mesh restarted on its
data dir (auth already on) adds only what is new."""

from __future__ import annotations

import logging

import aetcd.rpc as etcdrpc
import grpc

from services.common import etcd_roles, grpc_util
from services.common.tls import TlsFiles

log = logging.getLogger(__name__)

ROOT = "root"
_PERMISSIONS = {etcd_roles.READ: 0, etcd_roles.WRITE: 1, etcd_roles.READWRITE: 2}


def _tolerate_exists(call, request) -> None:
    try:
        call(request, timeout=10)
    except grpc.RpcError as exc:
        if "already exists" not in (exc.details() or "") and "already" not in (exc.details() or ""):
            raise


def enable(endpoint: str, root: TlsFiles, components: list[tuple[str, str]]) -> None:
    """Users and roles for `components` (kind, name), a root user, then auth on."""
    with grpc_util.channel(endpoint, options=[], tls=root) as channel:
        auth = etcdrpc.AuthStub(channel)
        no_password = etcdrpc.UserAddOptions(no_password=True)
        _tolerate_exists(auth.UserAdd, etcdrpc.AuthUserAddRequest(name=ROOT, options=no_password))
        _tolerate_exists(auth.RoleAdd, etcdrpc.AuthRoleAddRequest(name=ROOT))
        auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=ROOT, role=ROOT), timeout=10)
        for kind, name in components:
            grants = etcd_roles.grants(kind, name)
            if not grants or name == ROOT:
                continue
            _tolerate_exists(auth.UserAdd, etcdrpc.AuthUserAddRequest(name=name, options=no_password))
            _tolerate_exists(auth.RoleAdd, etcdrpc.AuthRoleAddRequest(name=name))
            for g in grants:
                perm = etcdrpc.Permission(permType=_PERMISSIONS[g.permission], key=g.key.encode(),
                                          range_end=etcd_roles.prefix_end(g.key) if g.prefix else b"")
                auth.RoleGrantPermission(etcdrpc.AuthRoleGrantPermissionRequest(name=name, perm=perm),
                                         timeout=10)
            auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=name, role=name), timeout=10)
        auth.AuthEnable(etcdrpc.AuthEnableRequest(), timeout=10)
    log.info("etcd auth on: %d component users", len(components))
