"""Pipeline swarms whose nodes run in network namespaces (`node.testing.netns`): public, or behind a NAT.

`run_nat_swarm(topo, root, places, ...)` starts one node process per stage inside the namespace its
place names ("public", or "home1", "home2", ... behind their own routers), the bootstrap node first,
waits for every ready line, lets the swarm train and returns the tail losses, every node's status
file (with its `nat` section) and progress. Every process is stopped on the way out (and again at the
topology's teardown).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.observability.status import node_status, read_progress
from node.testing.netns import PUBLIC_IP, Topology
from node.testing.swarm import (
    REPO_ROOT,
    NodeProcess,
    await_ready,
    node_command,
    node_env,
    stop_nodes,
    wait_nodes,
)


@dataclass
class NatSwarmResult:
    """Outcome of a swarm run in namespaces."""

    losses: list[float]  # per-step tail loss, in step order
    statuses: list[dict[str, Any]]  # per stage: the status file it left (with `nat`)
    progress: dict[int, list[dict[str, Any]]]  # stage -> progress records
    ready: list[dict[str, Any]]  # per stage: its ready line
    first_step_s: float  # seconds from the first launch to the tail's first trained step
    seconds: float  # seconds from the first launch to the last exit


def place_ns(topo: Topology, place: str) -> tuple[str, str]:
    """(namespace, listen IP) of a place: "public" or "home<i>"."""
    if place == "public":
        return topo.public_ns, PUBLIC_IP
    if place.startswith("home"):
        home = topo.homes[int(place[4:]) - 1]
        return home.home_ns, home.lan_ip
    raise ValueError(f"unknown place {place!r} (public, home1, home2, ...)")


def spawn_in(topo: Topology, place: str, stage: int, data_dir: Path, args: list[str]) -> NodeProcess:
    """Start one node process for `stage` in `place`, listening on that place's address."""
    ns, ip = place_ns(topo, place)
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = node_command(stage, data_dir, ["--listen", f"/ip4/{ip}/tcp/0", *args])
    with (data_dir / "stderr.log").open("ab") as log:
        proc = topo.popen(ns, cmd, stdout=subprocess.PIPE, stderr=log, env=node_env(), cwd=str(REPO_ROOT))
    return NodeProcess(stage=stage, data_dir=data_dir, proc=proc)


def _check_reachable(topo: Topology, places: list[str], addr: str, timeout_s: float = 10.0) -> None:
    """Every place can open a TCP connection to the bootstrap node (NodeError with the listening sockets if not)."""
    ip, port = addr.split("/")[2], int(addr.split("/")[4])
    for place in sorted(set(places)):
        ns, _ = place_ns(topo, place)
        deadline = time.monotonic() + timeout_s
        while not topo.can_connect(ns, ip, port):
            if time.monotonic() > deadline:
                listening = subprocess.run(topo.prefix(topo.public_ns) + ["ss", "-ltn"], capture_output=True,
                                           text=True, timeout=10).stdout
                raise NodeError(f"{place} cannot connect to the bootstrap node at {ip}:{port} within {timeout_s} s; "
                                f"listening in the public segment:\n{listening}")


def run_nat_swarm(topo: Topology, root: Path, places: list[str], node_args: list[str], *, bootstrap_stage: int = -1,
                  stage_args: dict[int, list[str]] | None = None, ready_timeout_s: float = 180.0,
                  timeout_s: float = 300.0, linger_bootstrap: bool = True,
                  during: Callable[[list[NodeProcess]], None] | None = None) -> NatSwarmResult:
    """Run len(places) stages, stage i in places[i]; `bootstrap_stage` (default the last) starts first and
    every other node bootstraps from it. `stage_args` adds flags per stage. NodeError if a node fails.

    linger_bootstrap: the bootstrap node (the relay of the private nodes) keeps serving after its last
    step (`--linger`) and is stopped once the others exited: a relay that is also the last stage would
    otherwise leave, taking the circuits of the last step's gradients with it, before they arrived.
    during: called with the nodes (by stage) once all are ready, while they train (a fault to inject)."""
    stages = len(places)
    boot = bootstrap_stage % stages
    extra = stage_args or {}
    common = ["--stages", str(stages), *node_args]
    t0 = time.monotonic()
    t0_wall = time.time()
    nodes: dict[int, NodeProcess] = {}
    try:
        linger = ["--linger"] if linger_bootstrap else []
        nodes[boot] = await_ready(spawn_in(topo, places[boot], boot, root / f"node{boot}",
                                           common + linger + extra.get(boot, [])), ready_timeout_s)
        addr = nodes[boot].ready["addrs"][0]
        _check_reachable(topo, places, addr)
        for s in range(stages):
            if s != boot:
                nodes[s] = spawn_in(topo, places[s], s, root / f"node{s}",
                                    common + ["--bootstrap", addr] + extra.get(s, []))
        for s in range(stages):
            if s != boot:
                await_ready(nodes[s], ready_timeout_s)
    except BaseException:
        stop_nodes(list(nodes.values()))
        raise
    ordered = [nodes[s] for s in range(stages)]
    if during is not None:
        try:
            during(ordered)
        except BaseException:
            stop_nodes(ordered)
            raise
    waited = [n for n in ordered if not (linger_bootstrap and n.stage == boot)]
    try:
        codes = dict(zip([n.stage for n in waited], wait_nodes(waited, timeout_s), strict=True))
    finally:
        stop_nodes(ordered)
    seconds = time.monotonic() - t0
    if linger_bootstrap:
        codes[boot] = 0 if nodes[boot].proc.returncode in (0, 143) else int(nodes[boot].proc.returncode)
    for n in ordered:
        code = codes[n.stage]
        if code != 0:
            err = (n.data_dir / "stderr.log").read_text()[-3000:]
            raise NodeError(f"node for stage {n.stage} in {places[n.stage]} exited with {code}: {err}")
    progress = {n.stage: read_progress(n.data_dir) for n in ordered}
    tail = progress[stages - 1]
    by_step = {int(r["step"]): float(r["loss"]) for r in tail}
    first = min((float(r["end_time"]) for r in tail if "end_time" in r), default=t0_wall) - t0_wall
    return NatSwarmResult(losses=[by_step[s] for s in sorted(by_step)],
                          statuses=[node_status(n.data_dir) for n in ordered], progress=progress,
                          ready=[n.ready for n in ordered], first_step_s=first, seconds=seconds)
