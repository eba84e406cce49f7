"""Fixtures the end-to-end modules share.

`smollm2_mesh`: one mesh serving the real model (SmolLM2-135M on the torch engine) behind Envoy,
a router and an OpenAI gateway, started once per session: loading the model costs tens of seconds
on a loaded 2-core machine, so every module that needs the real model through the whole mesh
(test_model_mesh.py, test_openai_model.py) uses this one instead of loading it again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import running_mesh

SMOLLM2 = "smollm2"
SMOLLM2_MAX_CONTEXT = 1024
SMOLLM2_KV_BLOCKS = 256


@pytest.fixture(scope="session")
def smollm2_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    plan = MeshPlan(
        data_dir=tmp_path_factory.mktemp("smollm2-mesh"), base_port=0, lease_ttl=3, gateways=1,
        servers=[ServerPlan("server-0", [f"{SMOLLM2}=torch:embedded"],
                            engine_options=["threads=2", f"kv_cache_blocks={SMOLLM2_KV_BLOCKS}",
                                            f"max_context={SMOLLM2_MAX_CONTEXT}"])])
    with running_mesh(plan) as mesh:
        yield mesh
