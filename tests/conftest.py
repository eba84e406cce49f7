"""Shared fixtures: real etcd members on free loopback ports.

Helpers (waiting, etcd clusters, meshctl, running meshes, request builders) live in
tests/helpers.py; the names below are re-exported because tests import them from here too.
Every process a fixture starts is stopped by PID when the fixture ends, even on failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, EtcdCluster, meshctl, running_mesh, wait_for

__all__ = ["REPO", "EtcdCluster", "meshctl", "running_mesh", "wait_for"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
