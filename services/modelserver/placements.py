"""Reading this server's placement records from etcd, trusting none of them.

A record may have been written around the control plane (by hand, by a buggy or older leader):
undecodable bytes, a spec naming another model than its key, an unknown backend, options the
backend does not know, a host path as source. Each such record becomes a reason the model manager
reports as that model's FAILED status; nothing here raises, so a bad record can never take the
server (or the rest of its models) down.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace, names
from services.common.errors import InvalidArgument

from .engine import ModelSpec, sources
from .engine import options as engine_options

log = logging.getLogger(__name__)


def placement_problem(placement: cp.Placement, model: str, server_id: str) -> str:
    """'' when the record may be loaded, else why not."""
    if placement.server_id not in ("", server_id):
        return f"the placement record is addressed to server {placement.server_id[:64]!r}"
    spec = placement.spec
    if not spec.name:
        return "the placement record names no model"
    if spec.name != model:
        return f"the placement record under {model!r} names model {spec.name[:64]!r}"
    try:
        engine_options.check_backend(spec.backend or "sim")
        sources.check_source(spec.backend or "sim", spec.source)
        engine_options.validate_options(spec.backend or "sim", dict(spec.options))
    except InvalidArgument as exc:
        return f"bad placement record: {exc.message}"
    if spec.memory_bytes < 0:
        return f"bad placement record: memory_bytes {spec.memory_bytes} < 0"
    return ""


class PlacementReader:
    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self._prefix = keyspace.placement_prefix(server_id)
        self._ignored: set[str] = set()

    def read(self, records: Mapping[str, bytes]) -> tuple[dict[str, cp.ModelSpec], dict[str, str]]:
        """(model -> spec to load, model -> why its record cannot be loaded)."""
        wanted: dict[str, cp.ModelSpec] = {}
        broken: dict[str, str] = {}
        for key, value in records.items():
            model = key[len(self._prefix):] if key.startswith(self._prefix) else ""
            if not names.is_valid_model(model):
                # No status key can be written for a name that breaks the rule: say it once.
                if key not in self._ignored:
                    self._ignored.add(key)
                    log.error("ignoring placement record %r: its key does not end in a valid "
                              "model name", key[:200])
                continue
            placement = keyspace.decode(cp.Placement, value)
            problem = ("the placement record cannot be decoded (corrupt bytes)"
                       if placement is None else placement_problem(placement, model, self.server_id))
            if problem or placement is None:
                broken[model] = problem
            else:
                wanted[model] = placement.spec
        return wanted, broken


def load_key(spec: cp.ModelSpec) -> tuple:
    """What decides the loaded engine: a change here means load again (the replica count and
    the generation do not; a new generation only retries failed loads)."""
    return (spec.backend or "sim", spec.source, spec.memory_bytes, tuple(sorted(spec.options.items())))


def spec_from_placement(spec: cp.ModelSpec, defaults: Mapping[str, object],
                        model_dirs: Sequence[str], server_id: str) -> ModelSpec:
    """The engine spec for a placement. The server's own engine options are defaults (e.g.
    threads suited to this machine), used where the backend knows them; the deployment's options
    override them. The source is resolved under this server's model directories.
    Raises InvalidArgument or FileNotFoundError with the reason to report."""
    backend = spec.backend or "sim"
    engine_options.check_backend(backend)
    deployed = engine_options.validate_options(backend, dict(spec.options))
    options = {k: v for k, v in defaults.items() if engine_options.known(backend, k)}
    options.update(deployed)
    source = sources.resolve(sources.check_source(backend, spec.source), model_dirs, server_id)
    return ModelSpec(name=spec.name, backend=backend, source=source, options=options)
