"""What the job tests share: a real JetStream cluster on loopback (1 or 3 nodes), stopped by PID."""

from __future__ import annotations

import functools
from pathlib import Path

from services.localmesh import components as c
from services.localmesh.jetstream import NatsNode, nats_argv, nats_healthy, write_config
from services.localmesh.processes import Child, Supervisor


class JetStreamCluster:
    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.root = root
        self.sup = Supervisor(root / "logs")
        self.nodes = [NatsNode(f"nats{i}", "127.0.0.1", c.free_port(), c.free_port(), c.free_port())
                      for i in range(nodes)]
        self.children: dict[str, Child] = {}

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(n.url for n in self.nodes)

    def start_node(self, i: int) -> Child:
        node = self.nodes[i]
        child = self.children[node.name] = self.sup.start(node.name, nats_argv(write_config(node, self.root,
                                                                                             self.nodes)))
        return child

    def start(self) -> None:
        for i in range(len(self.nodes)):
            self.start_node(i)
        for node in self.nodes:
            self.sup.wait_ready(self.children[node.name], functools.partial(nats_healthy, node), 60, "healthy")

    def kill(self, i: int) -> None:
        self.sup.kill(self.children[self.nodes[i].name])

    def stop(self) -> None:
        self.sup.stop()
