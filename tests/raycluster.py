"""A real multi-node Ray cluster on this machine: `ray start --head`, then `ray start --address`
for each further node, token auth on, as an operator starts one."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclasses.dataclass
class Cluster:
    address: str  # the GCS, for RAY_ADDRESS
    dashboard: str  # the job API
    env: dict[str, str]  # PATH and the token, for drivers and `ray job`
    nodes: list[subprocess.Popen[bytes]]  # each node's `ray start --block`, the head first
    _node_env: dict[str, str]
    _temps: list[str] = dataclasses.field(default_factory=list)

    def add_node(self, *args: str) -> None:
        """Start a node (`ray start ARGS`) and wait until the cluster counts it."""
        alive = self.alive_nodes() if self.nodes else 0
        # Short paths: Ray's socket paths are limited. Each node gets its own temp dir, as on
        # separate machines: two raylets sharing one would share runtime_resources/, and one
        # node's runtime-env agent, setting up a job's working_dir, deletes and re-extracts
        # the very folder another node's worker imports from (Ray unpacks with overwrite).
        self._temps.append(tempfile.mkdtemp(prefix=f"r{len(self.nodes)}", dir="/tmp"))
        (agent,) = free_ports(1)
        self.nodes.append(
            subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args]
                + [f"--dashboard-agent-listen-port={agent}", f"--temp-dir={self._temps[-1]}"],
                env=self._node_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        wait_for(lambda: self.alive_nodes() == alive + 1, f"node {len(self.nodes) - 1}")

    def state(self, code: str) -> str:
        """Run ``code`` (Python; ``ADDR`` stands for the dashboard) against the cluster."""
        result = subprocess.run(
            [sys.executable, "-c", code.replace("ADDR", self.dashboard)],
            env=os.environ | self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout.strip()

    def alive_nodes(self) -> int:
        code = (
            "from ray.util.state import list_nodes\n"
            "print(sum(n.state == 'ALIVE' for n in list_nodes(address='ADDR')))"
        )
        out = self.state(code)
        return int(out) if out.isdigit() else 0

    def raylet(self, node: int) -> int:
        """The pid of node ``node``'s raylet (a child of its `ray start`)."""
        (pid,) = [p for p in children(self.nodes[node].pid) if _comm(p) == "raylet"]
        return pid


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for(check: Callable[[], object], what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


@contextlib.contextmanager
def ray_cluster(head: Sequence[str], *workers: Sequence[str], **env: str) -> Iterator[Cluster]:
    """A head started with the `ray start` arguments ``head``, then one node per ``workers``
    (more with :meth:`Cluster.add_node`); ``env``: variables for every node (Ray's own
    settings, say)."""
    port, dashboard, client = free_ports(3)
    base = dict(os.environ)
    base.pop("RAY_ADDRESS", None)
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    base |= {"PATH": f"{BIN}:{base['PATH']}", "PYTHONPATH": str(ROOT), **token, **env}
    cluster = Cluster(
        address=f"127.0.0.1:{port}",
        dashboard=f"http://127.0.0.1:{dashboard}",
        env={"PATH": base["PATH"], **token},
        nodes=[],
        _node_env=base,
    )
    try:
        cluster.add_node(
            "--head",
            f"--port={port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            *head,
        )
        for args in workers:
            cluster.add_node(f"--address={cluster.address}", *args)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        for temp in cluster._temps:
            shutil.rmtree(temp, ignore_errors=True)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    """A process's title (Ray's workers set theirs to what they run: ``ray::…``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
