"""The local mesh: etcd, control plane, model servers, routers and Envoy as one process tree.

Used by `meshserve up` and by the end-to-end tests. Ports come from a plan: fixed offsets from a
base port, or free ports outside the OS's ephemeral range (services/common/ports.py). Every port
is checked, the way the servers bind, before anything starts; a port left in TIME_WAIT by the
previous run counts as free, so a mesh restarts at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from services.common import certs, jwt_local
from services.common import ports as port_rules
from services.common.envoy_config import EnvoySettings, render, sds_files
from services.common.tls import TlsFiles

from . import cache_store as cs
from . import components as c
from . import etcd_auth
from .jetstream import NatsNode, nats_argv, nats_healthy, write_config
from .processes import Child, StartError, Supervisor

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


@dataclass
class ServerPlan:
    server_id: str
    models: list[str] = field(default_factory=list)  # pinned: NAME=BACKEND[:SOURCE]
    region: str = "local"
    zone: str = "local-a"
    engine_options: list[str] = field(default_factory=list)
    memory_bytes: int = 0
    extra_args: list[str] = field(default_factory=list)


@dataclass
class MeshPlan:
    data_dir: Path
    servers: list[ServerPlan]
    routers: int = 1
    controlplanes: int = 1
    controlplane_args: list[str] = field(default_factory=list)
    etcd_members: int = 1
    base_port: int = 0  # 0: free ports picked by the OS
    lease_ttl: int = 10
    load_timeout_s: float = 180.0
    #: Extra `meshserve router` flags for every router (e.g. ["--policy", "round_robin"]).
    router_args: list[str] = field(default_factory=list)
    #: Envoy's edge rate limit in requests per second (None = EnvoySettings' generous default).
    envoy_rate_limit_per_s: int | None = None
    #: Ring-hash the session header onto routers instead of least-request.
    envoy_session_ring_hash: bool = False
    #: OTLP/gRPC collector (host:port) for the spans of every service and Envoy ('' = no tracing).
    otlp_endpoint: str = ""
    #: OpenAI gateways (`meshserve openai-gateway`) behind Envoy's /v1/chat/completions,
    #: /v1/completions and /v1/models; `meshserve up` starts one, tests that need it ask.
    gateways: int = 0
    #: Extra `meshserve openai-gateway` flags for every gateway.
    gateway_args: list[str] = field(default_factory=list)
    #: mTLS on every internal hop and etcd, certificates from a CA in `<data_dir>/certs` (made
    #: on first start). False = --insecure-dev everywhere (tests that dial internal ports in
    #: plaintext; `meshserve up` is secure unless told --insecure-dev).
    secure: bool = False
    #: The shared cache store's maxmemory (0 = no store: servers cache only in their own pool).
    cache_store_bytes: int = 0
    #: Servers planned (ports, ids) but not started: a server pool starts them when placement
    #: needs them (services/localmesh/serverpool.py).
    standby_servers: list[ServerPlan] = field(default_factory=list)
    #: NATS JetStream nodes for jobs and batches (0: none, and routers serve no JobService; 3 makes
    #: a cluster whose streams keep 3 replicas) and job workers using them.
    jetstream_nodes: int = 0
    job_workers: int = 0
    #: Extra `meshserve jobworker` flags (e.g. ["--fill", "0.5"]).
    job_worker_args: list[str] = field(default_factory=list)


class PortPlan:
    """Fixed ports from a base (predictable for people) or free ones (parallel tests)."""

    def __init__(self, base: int) -> None:
        self._base = base
        self.assigned: dict[str, int] = {}

    def take(self, name: str, offset: int) -> int:
        port = self._base + offset if self._base else c.free_port(HOST)
        self.assigned[name] = port
        return port

    def ephemeral(self) -> list[str]:
        """Ports of the plan inside the OS's ephemeral range: an outgoing connection may hold
        one at any moment, so a start there can fail at random."""
        return [f"{name} ({port})" for name, port in self.assigned.items()
                if port_rules.in_ephemeral_range(port)]

    def check(self) -> None:
        seen: dict[int, str] = {}
        for name, port in self.assigned.items():
            if port in seen:
                raise StartError(f"{seen[port]} and {name} would share port {port}: the plan has "
                                 "too many processes for the fixed offsets; use --base-port 0")
            seen[port] = name
        taken = [f"{name} ({port})" for name, port in self.assigned.items() if c.port_taken(HOST, port)]
        if taken:
            raise StartError(
                "port(s) already in use on 127.0.0.1: " + ", ".join(taken) +
                ". Stop whatever holds them (`ss -ltnp`), or pass --base-port to move the mesh.")


class LocalMesh:
    def __init__(self, plan: MeshPlan) -> None:
        self.plan = plan
        self.data_dir = Path(plan.data_dir).resolve()
        self.sup = Supervisor(self.data_dir / "logs")
        ports = PortPlan(plan.base_port)
        self.etcd_clients = [f"{HOST}:{ports.take(f'etcd{i}', 79 + 100 * i)}"
                             for i in range(plan.etcd_members)]
        self.etcd_peers = [f"{HOST}:{ports.take(f'etcd{i}-peer', 80 + 100 * i)}"
                           for i in range(plan.etcd_members)]
        self.envoy = f"{HOST}:{ports.take('envoy', 0)}"
        self.envoy_admin = f"{HOST}:{ports.take('envoy-admin', 1)}"
        self.controlplanes = [f"{HOST}:{ports.take(f'controlplane{i}', 10 + i)}"
                              for i in range(plan.controlplanes)]
        self.routers = [f"{HOST}:{ports.take(f'router{i}', 20 + i)}" for i in range(plan.routers)]
        #: Each router's ext_authz check for Envoy (secure meshes: the edge needs API keys).
        self.authz = ([f"{HOST}:{ports.take(f'router{i}-authz', 40 + i)}" for i in range(plan.routers)]
                      if plan.secure else [])
        self.nats = [NatsNode(f"nats{i}", HOST, ports.take(f"nats{i}", 81 + i), ports.take(f"nats{i}-monitor", 84 + i),
                              ports.take(f"nats{i}-cluster", 87 + i)) for i in range(plan.jetstream_nodes)]
        self.jobworkers = [f"{HOST}:{ports.take(f'jobworker{i}', 90 + i)}" for i in range(plan.job_workers)]
        self.servers = {s.server_id: f"{HOST}:{ports.take(s.server_id, 30 + i)}"
                        for i, s in enumerate([*plan.servers, *plan.standby_servers])}
        #: Each gateway's OpenAI HTTP listener (what Envoy routes to) and its gRPC health port.
        self.gateways_http = [f"{HOST}:{ports.take(f'gateway{i}-http', 60 + i)}" for i in range(plan.gateways)]
        self.gateways = [f"{HOST}:{ports.take(f'gateway{i}', 70 + i)}" for i in range(plan.gateways)]
        self.metrics = {name: f"{HOST}:{ports.take(f'{name}-metrics', 50 + i)}"
                        for i, name in enumerate([*(f"controlplane{i}"
                                                    for i in range(plan.controlplanes)),
                                                  *self.servers,
                                                  *(f"router{i}" for i in range(plan.routers)),
                                                  *(f"gateway{i}" for i in range(plan.gateways)),
                                                  *(f"jobworker{i}" for i in range(plan.job_workers))])}
        #: The shared cache store (redis-server), when the plan has one.
        self.cache_store = f"{HOST}:{ports.take('cache-store', 99)}" if plan.cache_store_bytes else ""
        self.ports = ports
        self.children: dict[str, Child] = {}
        self.certs_dir = self.data_dir / "certs"

    # --- identities -------------------------------------------------------------------------

    def components(self) -> list[tuple[str, str]]:
        """(kind, name) of every certificate the mesh needs; `operator` is meshctl's,
        `supervisor` is what readiness checks present and `root` sets up etcd's auth."""
        return [*((("etcd", f"etcd{i}")) for i in range(len(self.etcd_clients))),
                *(("controlplane", f"controlplane{i}") for i in range(self.plan.controlplanes)),
                *(("server", s.server_id) for s in self.plan.servers),
                *(("router", f"router{i}") for i in range(self.plan.routers)),
                *(("gateway", f"gateway{i}") for i in range(self.plan.gateways)),
                *(("jobworker", f"jobworker{i}") for i in range(self.plan.job_workers)),
                *(("server", s.server_id) for s in self.plan.standby_servers),
                *(("store", n.name) for n in self.nats), *([("store", "cache-store")] if self.cache_store else []),
                ("envoy", "envoy"), ("operator", "operator"), ("client", "supervisor"),
                ("client", "root")]

    def security_args(self) -> list[str]:
        """The flags that give a service of this mesh its identity (or plaintext)."""
        return ["--tls-dir", str(self.certs_dir)] if self.plan.secure else ["--insecure-dev"]

    def tls(self, name: str) -> TlsFiles | None:
        """Component `name`'s certificate files (None when the mesh runs plaintext)."""
        return TlsFiles.from_dir(self.certs_dir, name) if self.plan.secure else None

    @property
    def client_tls(self) -> TlsFiles | None:
        """What a client of the internal ports presents (readiness checks, tests)."""
        return self.tls("supervisor")

    @property
    def operator_tls(self) -> TlsFiles | None:
        return self.tls("operator")

    @property
    def controlplane(self) -> str:
        """The first control-plane replica (what meshctl talks to by default)."""
        return self.controlplanes[0]

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(self.etcd_clients)

    @property
    def jetstream_urls(self) -> str:
        return ",".join(node.url for node in self.nats)

    def _jetstream_args(self) -> list[str]:
        if not self.nats:
            return []
        return ["--jetstream", self.jetstream_urls, "--jetstream-replicas", str(min(3, len(self.nats)))]

    # --- starting ---------------------------------------------------------------------------

    def _check_mode(self) -> None:
        """A data dir whose etcd had auth turned on cannot serve a plaintext mesh: every write
        would be refused (no user name), so say so before starting anything."""
        marker = self.data_dir / "security-mode"
        has_etcd = any((self.data_dir / f"etcd{i}" / "member").exists()
                       for i in range(len(self.etcd_clients)))
        if (not self.plan.secure and has_etcd and marker.exists()
                and marker.read_text().strip() == "mtls"):
            raise StartError(f"{self.data_dir} holds the etcd data of a secure mesh (etcd auth is on "
                             "in it); start it without --insecure-dev, or use another --data-dir "
                             f"(or remove {self.data_dir}/etcd*)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text("mtls\n" if self.plan.secure else "insecure-dev\n")

    def start(self) -> None:
        self.ports.check()
        self._check_mode()
        if self.plan.secure:
            certs.ensure(self.certs_dir, self.components())
        self.sup.new_run()
        try:
            self.start_etcd()
            self.start_jetstream()
            if self.cache_store:
                self.start_cache_store()
            for i in range(self.plan.controlplanes):
                self.start_controlplane(i)
            for server in self.plan.servers:
                self.start_server(server)
            for i in range(self.plan.routers):
                self.start_router(i)
            for i in range(self.plan.gateways):
                self.start_gateway(i)
            for i in range(self.plan.job_workers):
                self.start_jobworker(i)
            self.start_envoy()
        except BaseException:
            self.stop()
            raise

    def start_etcd(self) -> None:
        for i in range(len(self.etcd_clients)):
            self._spawn_etcd(i)
        for i, client in enumerate(self.etcd_clients):
            self.sup.wait_ready(self.children[f"etcd{i}"],
                                partial(c.etcd_healthy, client, tls=self.client_tls), 30, "healthy")
        root = self.tls("root")
        if root is not None:  # a user and role per component, then auth on (etcd_roles.py)
            etcd_auth.enable(self.etcd_clients[0], root, self.components())

    def _spawn_etcd(self, i: int) -> Child:
        name = f"etcd{i}"
        cluster = {f"etcd{j}": peer for j, peer in enumerate(self.etcd_peers)}
        child = self.sup.start(name, c.etcd_argv(
            name, self.data_dir / name, self.etcd_clients[i], self.etcd_peers[i], cluster,
            new_cluster=not (self.data_dir / name / "member").exists(), tls=self.tls(name)))
        self.children[name] = child
        return child

    def start_jetstream(self) -> None:
        for i in range(len(self.nats)):
            self.start_nats_node(i, wait=False)
        for i, node in enumerate(self.nats):
            self.sup.wait_ready(self.children[f"nats{i}"], partial(nats_healthy, node), 60, "healthy (JetStream)")

    def start_nats_node(self, i: int, wait: bool = True) -> Child:
        """Start (or restart, on its data) JetStream node i."""
        node = self.nats[i]
        config = write_config(node, self.data_dir / "jetstream", self.nats, self.tls(node.name))
        child = self.children[node.name] = self.sup.start(node.name, nats_argv(config))
        if wait:
            self.sup.wait_ready(child, partial(nats_healthy, node), 60, "healthy (JetStream)")
        return child

    def start_jobworker(self, i: int) -> Child:
        name = f"jobworker{i}"
        child = self.children[name] = self.sup.start(name, c.service_argv(
            "jobworker", *self._common(name, self.jobworkers[i]), *self._jetstream_args(),
            *self.plan.job_worker_args))
        self.sup.wait_ready(child, lambda: self.serving(self.jobworkers[i]), 60, "serving")
        return child

    def restart_etcd_member(self, i: int) -> Child:
        """Start a stopped member again on its data (failure tests); does not wait for quorum."""
        return self._spawn_etcd(i)

    def start_cache_store(self) -> Child:
        port = int(self.cache_store.rpartition(":")[2])
        child = self.sup.start("cache-store", cs.redis_argv(HOST, port, self.data_dir / "cache-store",
                                                            self.plan.cache_store_bytes, self.tls("cache-store")))
        self.children["cache-store"] = child
        self.sup.wait_ready(child, lambda: cs.redis_ready(self.cache_store, self.client_tls), 30, "answering PING")
        return child

    def _common(self, name: str, listen: str) -> list[str]:
        args = ["--id", name, "--listen", listen, "--etcd", self.etcd_endpoints,
                "--metrics", self.metrics[name], "--lease-ttl", str(self.plan.lease_ttl),
                *self.security_args()]
        if self.plan.otlp_endpoint:
            args += ["--otlp-traces-endpoint", "http://" + self.plan.otlp_endpoint.removeprefix("http://")]
        return args

    def serving(self, address: str) -> bool:
        """Whether a service of this mesh answers SERVING (over mTLS when the mesh is secure)."""
        return c.grpc_serving(address, tls=self.client_tls)

    def start_controlplane(self, i: int) -> Child:
        name = f"controlplane{i}"
        child = self.sup.start(name, c.service_argv(
            "controlplane", *self._common(name, self.controlplanes[i]),
            *self.plan.controlplane_args))
        self.children[name] = child
        self.sup.wait_ready(child, lambda: self.serving(self.controlplanes[i]), 60, "serving")
        return child

    def start_server(self, server: ServerPlan, wait: bool = True) -> Child:
        address = self.servers[server.server_id]
        args = self._common(server.server_id, address) + ["--region", server.region,
                                                          "--zone", server.zone]
        for m in server.models:
            args += ["--model", m]
        for o in server.engine_options:
            args += ["--engine-option", o]
        args += ["--memory-bytes", str(server.memory_bytes), *server.extra_args]
        if self.cache_store:
            args += ["--cache-store", cs.redis_url(self.cache_store, self.plan.secure)]
        child = self.sup.start(server.server_id, c.service_argv("modelserver", *args))
        self.children[server.server_id] = child
        if wait:
            self.sup.wait_ready(child, lambda: self.serving(address), self.plan.load_timeout_s,
                                "serving (model loaded)")
        return child

    def stop_server(self, server_id: str) -> None:
        """Stop one model server (it drains first) and forget it, so it can start again."""
        child = self.children.pop(server_id, None)
        if child is not None:
            self.sup.stop_child(child)

    def start_router(self, i: int) -> None:
        name = f"router{i}"
        authz = ["--authz-listen", self.authz[i]] if self.authz else []
        self.children[name] = self.sup.start(name, c.service_argv(
            "router", *self._common(name, self.routers[i]), *authz, *self._jetstream_args(),
            *self.plan.router_args))
        self.sup.wait_ready(self.children[name], lambda: self.serving(self.routers[i]), 60,
                            "serving")

    def start_gateway(self, i: int) -> Child:
        """An OpenAI gateway calling InferenceService through Envoy (up next, or already up)."""
        name = f"gateway{i}"
        child = self.sup.start(name, c.service_argv(
            "openai-gateway", *self._common(name, self.gateways[i]), "--http", self.gateways_http[i],
            "--upstream", self.envoy, *self.plan.gateway_args))
        self.children[name] = child
        self.sup.wait_ready(child, lambda: self.serving(self.gateways[i]), 60, "serving")
        return child

    def start_envoy(self) -> None:
        config = self.data_dir / "envoy.yaml"
        settings = EnvoySettings(
            listen=self.envoy, admin=self.envoy_admin, routers=self.routers,
            access_log=str(self.sup.log_dir / "envoy-access.log"),
            session_ring_hash=self.plan.envoy_session_ring_hash, gateways=self.gateways_http,
            otlp_endpoint=self.plan.otlp_endpoint)
        envoy_tls = self.tls("envoy")
        if envoy_tls is not None:
            settings.tls_cert, settings.tls_key = str(envoy_tls.cert), str(envoy_tls.key)
            settings.tls_ca = str(envoy_tls.ca)
            settings.authz = self.authz
            settings.jwks = str(jwt_local.ensure_issuer(self.certs_dir))
            for name, text in sds_files(settings).items():
                (self.certs_dir / name).write_text(text)
        if self.plan.envoy_rate_limit_per_s is not None:
            settings.rate_limit_per_s = self.plan.envoy_rate_limit_per_s
        config.write_text(render(settings))
        base_id = int(self.envoy_admin.rpartition(":")[2])
        child = self.sup.start("envoy", c.envoy_argv(config, base_id,
                                                     self.sup.log_dir / "envoy-server.log"))
        self.children["envoy"] = child
        self.sup.wait_ready(child, lambda: c.envoy_ready(self.envoy_admin), 30, "ready")
        self.sup.wait_ready(child, lambda: c.envoy_cluster_healthy(self.envoy_admin), 30,
                            "routing (a healthy router behind it)")
        if self.gateways_http:
            self.sup.wait_ready(child, lambda: c.envoy_cluster_healthy(self.envoy_admin, "openai_gateway"),
                                30, "routing to a healthy OpenAI gateway")

    # --- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.sup.stop()

    def pids(self) -> dict[str, int]:
        return {name: ch.pid for name, ch in self.children.items() if ch.pid}
