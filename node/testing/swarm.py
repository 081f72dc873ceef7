"""Local swarm launcher: P node processes on 127.0.0.1 (what `pmn swarm` runs)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.observability.status import node_status, read_progress

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class NodeProcess:
    """One launched node."""

    stage: int  # stage it was told to serve (or -1 for auto)
    data_dir: Path  # its data directory
    proc: subprocess.Popen[bytes]  # the process
    ready: dict[str, Any] = field(default_factory=dict)  # its ready line (peer_id, addrs, stage, ...)
    lines: list[str] = field(default_factory=list)  # stdout lines after the ready line


@dataclass
class SwarmResult:
    """Outcome of a local swarm run."""

    losses: list[float]  # per-step tail loss, in step order (only steps completed in this run and before)
    steps: dict[int, list[dict[str, Any]]]  # stage -> progress records
    peers: list[dict[str, Any]]  # ready lines of every node
    exit_codes: list[int]  # per node, in launch order


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        if chunk == b"\n":
            return buf.decode()
        buf += chunk
    raise NodeError(f"node process {proc.pid} printed no ready line within {timeout_s} s "
                    f"(exit code {proc.poll()}, partial output {buf[-300:]!r})")


def node_command(stage: int | str, data_dir: Path, args: list[str]) -> list[str]:
    """The command line of one node process (`python -m node.daemon`, flags of `node.cli`)."""
    return [sys.executable, "-m", "node.daemon", "--stage", str(stage), "--data-dir", str(data_dir),
            "--no-progress", *args]


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node process: ours without `PMN_*` variables (a launched node is configured by
    its flags alone, not by an operator's PMN_LISTEN or PMN_DATA_DIR), plus `extra`, with this tree first
    on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMN_")}
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def spawn_node(stage: int | str, data_dir: Path, args: list[str], env: dict[str, str] | None = None) -> NodeProcess:
    """Start one node process (stderr goes to data_dir/stderr.log); call await_ready next."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "stderr.log").open("ab") as log:
        proc = subprocess.Popen(node_command(stage, data_dir, args), stdout=subprocess.PIPE, stderr=log,
                                env=node_env(env), cwd=str(REPO_ROOT))
    return NodeProcess(stage=int(stage) if str(stage) != "auto" else -1, data_dir=data_dir, proc=proc)


def await_ready(node: NodeProcess, ready_timeout_s: float = 60.0) -> NodeProcess:
    """Wait for the node's ready line (NodeError with its output if it fails to start; the process is stopped)."""
    try:
        line = _read_line(node.proc, ready_timeout_s)
        msg = json.loads(line)
        if msg.get("event") != "ready":
            raise NodeError(f"node for stage {node.stage} failed to start: {msg.get('error', line)}")
        node.ready = msg
        if node.stage < 0:
            node.stage = int(msg["stage"])
    except BaseException:
        stop_nodes([node])
        raise
    return node


def start_node(stage: int | str, data_dir: Path, args: list[str], ready_timeout_s: float = 60.0,
               env: dict[str, str] | None = None) -> NodeProcess:
    """Start one node process and wait for its ready line."""
    return await_ready(spawn_node(stage, data_dir, args, env), ready_timeout_s)


def stop_nodes(nodes: list[NodeProcess], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, every node still running."""
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for n in nodes:
        try:
            n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait()
        if n.proc.stdout is not None:
            n.proc.stdout.close()


def launch_swarm(root: Path, stages: int, node_args: list[str], ready_timeout_s: float = 60.0,
                 threads: list[int] | None = None, auto_stage: bool = False,
                 metrics_base_port: int = 0, status_base_port: int = 0) -> list[NodeProcess]:
    """Start stage 0, then stages 1..P-1 bootstrapping from it: together when stages are explicit,
    one after another with auto_stage (each node picks the least-served stage it sees)."""
    nodes: list[NodeProcess] = []

    def args_for(s: int) -> list[str]:
        extra = ["--stages", str(stages), *node_args]
        if threads:
            extra += ["--threads", str(threads[s])]
        if metrics_base_port:
            extra += ["--metrics-port", str(metrics_base_port + s)]
        if status_base_port:
            extra += ["--status-port", str(status_base_port + s)]
        if nodes:
            extra += ["--bootstrap", nodes[0].ready["addrs"][0]]
        return extra

    try:
        nodes.append(start_node("auto" if auto_stage else 0, root / "node0", args_for(0), ready_timeout_s))
        if auto_stage:
            for s in range(1, stages):
                nodes.append(start_node("auto", root / f"node{s}", args_for(s), ready_timeout_s))
        else:
            _join_together(nodes, [spawn_node(s, root / f"node{s}", args_for(s)) for s in range(1, stages)],
                           ready_timeout_s)
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def launch_replicas(root: Path, layout: list[int], node_args: list[str], ready_timeout_s: float = 60.0,
                    threads: int | None = None, extra: dict[int, list[str]] | None = None) -> list[NodeProcess]:
    """Start replicated nodes (`--replicated` is added): node i serves stage layout[i] from `root/node<i>`, with
    `extra[i]` after the common flags. Node 0 (stage 0, the leading head) starts first and waits for every other
    node before its first step (`replicas.start_quorum`: on a loaded machine a node may be ready seconds after its
    stage peer, and a short run would end before it got work); the rest bootstrap from it together. A node that
    fails to start stops them all."""
    if not layout or layout[0] != 0 or sorted(set(layout)) != list(range(max(layout) + 1)):
        raise ValueError(f"layout {layout}: node 0 must serve stage 0, and every stage up to the last needs a node")
    args = ["--replicated", "--stages", str(max(layout) + 1), "--replicas-start-quorum", str(len(layout) - 1),
            *(["--threads", str(threads)] if threads else []), *node_args]
    extra = extra or {}
    nodes = [start_node(0, root / "node0", args + extra.get(0, []), ready_timeout_s)]
    boot = ["--bootstrap", nodes[0].ready["addrs"][0]]
    return _join_together(nodes, [spawn_node(s, root / f"node{i}", args + boot + extra.get(i, []))
                                  for i, s in enumerate(layout) if i], ready_timeout_s)


def _join_together(nodes: list[NodeProcess], rest: list[NodeProcess], ready_timeout_s: float) -> list[NodeProcess]:
    """Add `rest` (just spawned, starting side by side) to `nodes` and wait for each one's ready line; one that fails
    to start stops them all."""
    nodes.extend(rest)
    try:
        for n in rest:
            await_ready(n, ready_timeout_s)
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


DESCRIBE_STDERR_LINES = 5  # stderr lines of a stuck node quoted in a timeout's error


def describe(node: NodeProcess) -> str:
    """One line on a running node for an error: its status (state, stage, next step, last events) and the
    last lines of its stderr, so a swarm that hangs on a CI machine says where."""
    status = node_status(node.data_dir)
    keys = ("state", "stage", "next_step", "head_term", "last_resync", "ended_behind", "start_quorum", "error")
    shown = {k: status[k] for k in keys if k in status}
    bans = status.get("bans") or []
    if bans:
        shown["last_events"] = bans[-3:]
    log = node.data_dir / "stderr.log"
    tail = log.read_text(errors="replace").splitlines()[-DESCRIBE_STDERR_LINES:] if log.exists() else []
    return f"{node.data_dir.name} (stage {node.stage}) status {json.dumps(shown)} stderr tail {tail}"


def wait_nodes(nodes: list[NodeProcess], timeout_s: float) -> list[int]:
    """Wait for every node to exit; on timeout stop them all and raise NodeError."""
    deadline = time.monotonic() + timeout_s
    codes = []
    try:
        for n in nodes:
            left = deadline - time.monotonic()
            try:
                codes.append(n.proc.wait(timeout=max(0.1, left)))
            except subprocess.TimeoutExpired as exc:
                stuck = "; ".join(describe(m) for m in nodes if m.proc.poll() is None)
                raise NodeError(f"swarm did not finish within {timeout_s} s (stage {n.stage} still running): "
                                f"{stuck}") from exc
            assert n.proc.stdout is not None
            n.lines = [ln for ln in n.proc.stdout.read().decode().splitlines() if ln.strip()]
    finally:
        stop_nodes(nodes)
    return codes


def run_local_swarm(
    stages: int,
    steps: int,
    root: str | Path,
    *,
    model: str = "tiny",
    codec: str = "dense",
    microbatches: int = 4,
    microbatch_size: int = 4,
    corpus: str | None = None,
    threads: list[int] | None = None,
    timeout_s: float = 600.0,
    extra_args: list[str] | None = None,
    auto_stage: bool = False,
) -> SwarmResult:
    """Run a `stages`-stage swarm of node processes on 127.0.0.1 for `steps` global steps.

    root: directory holding one data dir per node (`node0`, `node1`, ...); reusing it resumes from
      the checkpoints there. model/codec/microbatches/microbatch_size: the training setup (all nodes
      share it). corpus: sharding.load_corpus source (None = stdlib). threads: torch threads per node.
    auto_stage: start every node with `--stage auto` (one after another) instead of explicit stages.
    Returns per-step tail losses and every node's progress; raises NodeError if a node fails.
    """
    root = Path(root).expanduser()
    args = ["--model", model, "--codec", codec, "--steps", str(steps), "--microbatches", str(microbatches),
            "--microbatch-size", str(microbatch_size), *(extra_args or [])]
    if corpus is not None:
        args += ["--corpus", corpus]
    nodes = launch_swarm(root, stages, args, threads=threads, auto_stage=auto_stage)
    codes = wait_nodes(nodes, timeout_s)
    for n, code in zip(nodes, codes, strict=True):
        if code != 0:
            err = (n.data_dir / "stderr.log").read_text()[-2000:]
            msgs = [ln for ln in n.lines if '"error"' in ln]
            raise NodeError(f"node for stage {n.stage} exited with {code}: {msgs[-1] if msgs else err}")
    progress = {n.stage: read_progress(n.data_dir) for n in nodes}
    tail = progress[stages - 1]
    by_step = {int(r["step"]): float(r["loss"]) for r in tail}
    return SwarmResult(losses=[by_step[s] for s in sorted(by_step)], steps=progress,
                       peers=[n.ready for n in nodes], exit_codes=codes)
