"""Pipeline schedules over emulated WAN links: tokens/s and busiest-stage utilisation of gpipe, 1f1b, async.

Emulation: a shaper on the path, outside the node. `tc netem` is not available in this machine's
kernel (no sch_netem; `tc qdisc add ... netem` fails), so the nodes run in one network namespace of
their own whose nftables `output` NAT chain redirects every TCP connection made in it to a relay
(`benchmarks/wan_shaper.py`) that forwards it to its original destination, each direction serialised at
the rate and delivered the delay later. The node processes, their libp2p hosts (TCP + Noise + yamux) and
the activation protocol are the real ones and know nothing of it (needs root, iproute2 and nft). The
links are checked before the runs: a 1-byte request/response round trip and a bulk TCP transfer between
two processes in the namespace.

Swarm: 3 stages, one node each by default. `--replicas R` runs R nodes per stage instead (3 R processes, the
replicated runner with the step exchange, PowerSGD at `--averaging-rank` / `--averaging-bits` and delegated head
work; async then is the replicated engine's window of `--max-staleness` steps, and 1f1b routes as gpipe does). Per
node utilisation is its `compute_s` over the same window. Replica averaging's quality (dense vs PowerSGD on 3
stages with the middle and tail stages replicated) is measured by benchmarks/wan_averaging.py, run from here after
the schedules (`--averaging-steps`, 0 skips it): its figures are `replica_compression` (dense / compressed bytes of
a full step, every replica computing, from the measured bytes per contribution) and `loss_ratio_compressed_avg`.

Utilisation of a stage = its compute seconds (forward, backward, optimiser, data; `busy_s` of the
progress records) / the wall time between its first and last step ends (the first step, which holds
start-up, is left out); the table and JSON give the busiest stage's. tokens/s is the tail's over the
same window. A run is 40 steps by default (12 before session 16), so that the once-per-run fill and the async
schedule's final drain weigh less.

`loss_ratio_async`: validation loss of the async schedule (delayed gradients, the bound used here) over
gpipe's at equal tokens on the benchmark model, from the single-process references
(`sharding.delayed.train_delayed` / `sharding.train_reference`), which the node swarm reproduces exactly
(tests/node/test_schedules.py).

`--grad-clip C` runs every schedule and both loss arms with global-norm clipping (`recipe.grad_clip`): the
synchronous schedules exchange the norm at each step's flush (a round trip through the stages), the async one
carries it on NORM frames between steps (`node.pipeline.asyncrun`).

Last line: JSON with `utilisation` (per schedule), `tokens_per_s` (per schedule), `replica_compression`,
`loss_ratio_async`, `loss_ratio_compressed_avg`, the link check and the settings.

`host_cpu` (per schedule, over the busiest stage's utilisation window): the host's busy fraction of its cores and
the CPU each node and the shaper used per wall second, sampled from /proc while the run goes on. On a host with
fewer cores than stage processes a stage's busy time includes time it waited for a core inside its compute,
and its idle time time it waited for one between computations: the utilisation then measures the host as much
as the schedule. `python -m simulations.wan_bench OUTPUT` prints what the calibrated simulator makes of the same
links with the calibration (gpipe) run's compute, a core per stage (`async_utilisation_calibration_compute`).

The replica part runs PowerSGD rank 6 with int4 factors by default since session 21 (`--averaging-bits 4`: 119-120x
below dense-bf16 at 0.9991 / 1.0119 / 1.0099 on seeds 0 / 1 / 2 with AdamW, `benchmarks/wan_averaging.py`); the runs
below used int8.

Measured here (session 19, defaults, nothing else running, 2 cores): link check 101.4 ms round trip, 199.7
Mbit/s; utilisation gpipe 0.367 (6809 tokens/s), 1f1b 0.196 (4082), async 0.803 (11020); loss_ratio_async
1.1396 (300 steps, staleness 1); replicas 59.8x below a dense-bf16 exchange at a loss ratio of 1.018 (PowerSGD
rank 6 int8, 3 power iterations, wide model, 150 steps). Host CPU: gpipe 0.57 of the 2 cores busy (each stage
0.34-0.38 of a core: its busy fraction), async 0.94 busy, each stage 0.58-0.62 of a core while its busy
fraction read 0.75-0.80: the async run was short of cores, and its compute took about 30 % longer per step than
gpipe's (0.299 s against 0.221 s at stage 1). With gpipe's compute the simulator (held-out error 0.020 on
async) gives async 0.721 at staleness 1 and 0.770 at 2 and 3: with a core per stage, what keeps a stage from
0.9 here is mostly the runtime's time per frame outside compute (fitted 4.1 ms), not the links.
With `--grad-clip 1.0 --averaging-steps 0` (session 19, the first run with clipping): gpipe 0.286 (5000
tokens/s: each step's norm round trip through the stages costs it a quarter of its speed), 1f1b 0.176 (3276),
async 0.807 (11083: the NORM frames cost it nothing measurable); loss_ratio_async 1.0934 (300 steps, staleness
1; gpipe 1.8970, async 2.0742): clipping narrows the short-run async gap (1.1396 unclipped).
With the Muon recipe, `--optimizer muon --lr 1e-2 --lookahead 2 --averaging-steps 0` (session 20, nothing else
running): link check 101.6 ms, 198.8 Mbit/s; gpipe 0.446 (6282 tokens/s), 1f1b 0.224 (3854), async 0.838 (9626;
host 0.94 busy, stages 0.57-0.63 of a core): Muon's step adds compute, so every schedule reads busier and runs
fewer tokens/s; loss_ratio_async 1.0442 (300 steps; gpipe 1.5818, async 1.6517), against AdamW's 1.1396 at this
length (over 3000 steps the Muon recipe reaches 0.991, benchmarks/async_recipe.py).

Session 16 (defaults, 40 steps, nothing else running): link check 101.8 ms round trip, 199.3
Mbit/s; utilisation gpipe 0.355 (6770 tokens/s), 1f1b 0.186 (4034), async 0.789 (11427); loss_ratio_async
1.1596 (300 steps, staleness 1); replicas 92.1x below dense at a loss ratio of 1.018 (PowerSGD rank 8 int8,
wide model, 150 steps). The stages computed faster than in session 15 (async busy 0.28 s per step at stage 1)
and the links did not, so utilisation is lower. `python -m simulations.wan_bench` on it: held-out error 0.045
(1f1b), 0.002 (async).

Session 15 (defaults with 12 steps, 2 cores; another training process ran during the gpipe run and an
in-process averaging comparison during the loss and replica parts, so gpipe's speed may read low): link check
104.1 ms round trip, 198.7 Mbit/s; utilisation gpipe 0.516 (5878 tokens/s), 1f1b 0.254 (3369), async 0.887
(8045); loss_ratio_async 1.1596 (300 steps, staleness 1); replicas: PowerSGD rank 8 int8 93.3x below dense
at a loss ratio of 1.0176 (wide model, 150 steps). `python -m simulations.wan_bench` on this output: held-out
error 0.065 (1f1b) and 0.115 (async). With `--schedules async --max-staleness 2 --averaging-steps 0`: async
utilisation 0.948 (7684 tokens/s) at a loss ratio of 1.3271 (300 steps).
Replicated (session 25, `--replicas 2 --schedules gpipe,async --max-staleness 2 --steps 16 --averaging-steps 0
--loss-steps 30`, 2 cores): link check 101.4 ms, 199.3 Mbit/s; gpipe 2481 tokens/s (busiest node 0.113), async
3591 (0.273), host 0.42 / 0.67 busy; the first version of the replicated async window (its finish blocking the
node's loop) gave 3057 against gpipe's 2355 with the host 0.91 busy.
Session 26, same command with `--loss-steps 10`: before kept /pmn/avg streams, gpipe 2437 and 2508 tokens/s, async
4844 and 4241 (two runs); a replica's finish (the JSON's `replicated` phases) spent 0.32-0.42 s pushing a 14 kB
bundle (3.3 round trips: two of them a new stream's multistream-select) and `simulations.wan_bench` missed async by
0.295. With kept streams (`node.net.streampool`): gpipe 4245 tokens/s (busiest node 0.194), async 5197 (0.380),
host 0.60 / 0.81 busy; a bundle push 0.11-0.17 s, and the held-out async error 0.035. A repeat: gpipe 3910, async
4614 (0.211 / 0.378), predicted with the first run's fit within 0.009 and 0.069.
Session 28, `--replicas 2 --schedules async --max-staleness 2 --steps 16 --averaging-steps 0 --loss-steps 10`, runs
alternated (link checks 101.4-102.0 ms, 199.3-200.1 Mbit/s): `--max-inflight 2` (the node's default then) 7713 / 8137
/ 8764 tokens/s (busiest node 0.305 / 0.262 / 0.231, host 0.81 / 0.75 / 0.73 busy), `--max-inflight 4` 9617 / 9202 /
9539 (0.436 / 0.420 / 0.448, host 0.90 / 0.93 / 0.91): 17 % more tokens/s at the median, and the host's two cores
nearly full. With 2, a sender keeps at most 4 microbatches at the next stage's 2 replicas while a round trip through
3 stages takes at least 0.2 s, which the simulator showed binding before the window (`simulations.wan_bench`); the
node's `replicas.max_inflight` default is now 4 (the transport's credits). `simulations.wan_bench` fitted on the second
cap-2 run (`--calibrate-on async`) predicts the other two within 0.011 and 0.026 but the cap-4 runs 26-32 % too fast
(12029-12390 tokens/s): it gives every node a core of its own, and at cap 4 this host's two cores were 0.90-0.93 busy.
Session 32: each node now records its compute and update *CPU* seconds (`compute_cpu_s_per_step`,
`update_cpu_s_per_step` under `replicated`). At cap 4 and staleness 2 (`--steps 40`) a node's compute took 0.057-0.064
CPU seconds per step against 0.125-0.140 wall seconds in its compute thread (at cap 2, `--steps 16`: 0.043-0.079
against 0.066-0.114): on this host more than half of the busy time the utilisation counts at cap 4 is waiting for a
core. A py-spy profile of the six nodes (cap 4, staleness 2) put
about 60 % of their active samples in the compute threads (torch) and 34 % on the event loop (Noise and yamux reads
and writes, the streams' handlers, the averaging server's checks, discovery's signature checks of each peer's new
announcement: about a tenth of the loop's samples). `--serial-finish` runs the nodes as before session 32 (a step's
finish only after the step before was applied, `--no-replicas-pipelined-finish`); alternated with the default,
3 runs each, `--steps 24`: staleness 2, pipelined 8737 / 9179 / 9953 tokens/s against serial 9679 / 10083 / 8333;
staleness 3, pipelined 11140 / 9924 / 9307 against serial 10847 / 8729 / 8878, the host 0.9 busy throughout: no
difference this host can resolve (the simulator on the same runs: +0-2 % on the shared host, +11 % at staleness 3
with a core per node; run-to-run scatter here is up to 20 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.config import ReplicaConfig  # noqa: E402
from node.observability.status import read_progress  # noqa: E402
from node.testing.swarm import NodeProcess, await_ready, node_command, node_env, stop_nodes, wait_nodes  # noqa: E402
from protocol.modelspec import POWERSGD_BITS  # noqa: E402
from sharding import ModelConfig  # noqa: E402
from sharding.optimconfig import OPTIMIZERS  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "async")
# compute per microbatch of a few tens of ms per stage on one CPU thread: a step of compute is of the
# order of the 50 ms links, as a GPU stage of a 100M+ model is against home links
BENCH_MODEL = ModelConfig(vocab_size=256, seq_len=128, d_model=128, n_layers=6, n_heads=4)
VAL_WINDOWS, VAL_SEED = 64, 1234  # validation: windows of the corpus's validation split (sharding.validation_loss)
SHAPER_PORT = 7000  # where the namespace's TCP connections are redirected to


@dataclass(frozen=True)
class WanLink:
    """What every node's uplink gets."""

    delay_ms: float = 50.0  # one-way delay added on egress
    rate_mbit: float = 200.0  # egress rate limit, megabits per second


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class WanLab:
    """Network namespace `<prefix>` with loopback only, an nftables redirect of every TCP connection made
    in it to the shaper (`benchmarks/wan_shaper.py`), and the shaper running there; see the module doc."""

    def __init__(self, nodes: int, link: WanLink) -> None:
        self.n = nodes
        self.link = link
        self.prefix = f"pmnwan{os.getpid() % 100000}"
        self.made = False
        self.shaper: subprocess.Popen[bytes] | None = None

    def addr(self, i: int) -> str:
        """IPv4 address node i listens on (all share the namespace's loopback)."""
        return "127.0.0.1"

    def __enter__(self) -> WanLab:
        ns, port = self.prefix, str(SHAPER_PORT)
        try:
            _ip("netns", "add", ns)
            self.made = True
            _ip("-n", ns, "link", "set", "lo", "up")
            for rule in (["add", "table", "ip", "wan"],
                         ["add", "chain", "ip", "wan", "out", "{ type nat hook output priority -100; }"],
                         ["add", "rule", "ip", "wan", "out", "ip", "daddr", "127.0.0.0/8", "tcp", "dport", "!=", port,
                          "meta", "mark", "!=", "1", "redirect", "to", f":{port}"]):
                subprocess.run(self.exec(0, ["nft", *rule]), check=True, capture_output=True)
            shaper = Path(__file__).with_name("wan_shaper.py")
            self.shaper = subprocess.Popen(self.exec(0, [sys.executable, str(shaper), port, str(self.link.delay_ms),
                                                         str(self.link.rate_mbit)]), stdout=subprocess.PIPE)
            assert self.shaper.stdout is not None
            if self.shaper.stdout.readline().strip() != b"ready":
                raise RuntimeError("the WAN shaper did not start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shaper is not None:
            self.shaper.kill()
            self.shaper.wait()
            if self.shaper.stdout is not None:
                self.shaper.stdout.close()
            self.shaper = None
        if self.made:
            subprocess.run(["ip", "netns", "del", self.prefix], capture_output=True)
            self.made = False

    def exec(self, i: int, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace (every node shares it)."""
        return ["ip", "netns", "exec", self.prefix, *argv]


_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 7001)); s.listen(8)
print("up", flush=True)
while True:
    c, _ = s.accept()
    n = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big")
    if n == 0:
        c.recv(1, socket.MSG_WAITALL)
    got = 0
    while got < n:
        b = c.recv(1 << 20)
        if not b: break
        got += len(b)
    c.sendall(b"k"); c.close()
    if n == 0: pass
"""

_CLIENT = """
import socket, sys, time, json
host, nbytes = sys.argv[1], int(sys.argv[2])
rtts = []
for _ in range(5):
    c = socket.create_connection((host, 7001)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall((0).to_bytes(8, "big")); time.sleep(0.3)
    t = time.perf_counter(); c.sendall(b"p"); c.recv(1); rtts.append(time.perf_counter() - t); c.close()
c = socket.create_connection((host, 7001)); buf = b"x" * (1 << 20)
t = time.perf_counter(); c.sendall(nbytes.to_bytes(8, "big"))
left = nbytes
while left > 0:
    c.sendall(buf[:min(left, len(buf))]); left -= min(left, len(buf))
c.recv(1); dt = time.perf_counter() - t; c.close()
print(json.dumps({"rtt_ms": sorted(rtts)[2] * 1e3, "bulk_mbit_s": nbytes * 8 / (dt - sorted(rtts)[2]) / 1e6,
                  "bulk_bytes": nbytes}))
"""


def check_links(lab: WanLab, nbytes: int) -> dict[str, float]:
    """Median request/response round trip (1 byte each way) and bulk throughput between two processes."""
    server = subprocess.Popen(lab.exec(1, [sys.executable, "-c", _SERVER, lab.addr(1)]), stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        server.stdout.readline()
        out = subprocess.run(lab.exec(0, [sys.executable, "-c", _CLIENT, lab.addr(1), str(nbytes)]),
                             check=True, capture_output=True, text=True, timeout=300)
        result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


@contextmanager
def wan_swarm(lab: WanLab, root: Path, args: list[str], ready_timeout_s: float,
              replicas: int = 1) -> Iterator[list[NodeProcess]]:
    """Node i serves stage i // replicas; the others bootstrap from node 0 (stage 0's first replica)."""
    nodes: list[NodeProcess] = []

    def spawn(i: int, extra: list[str]) -> NodeProcess:
        data_dir = root / f"node{i}"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [*args, "--listen", f"/ip4/{lab.addr(i)}/tcp/0", *extra]
        stage = i // replicas
        with (data_dir / "stderr.log").open("ab") as log:
            proc = subprocess.Popen(lab.exec(i, node_command(stage, data_dir, argv)), stdout=subprocess.PIPE,
                                    stderr=log, env=node_env())
        node = NodeProcess(stage=stage, data_dir=data_dir, proc=proc)
        nodes.append(node)
        return node

    try:
        await_ready(spawn(0, []), ready_timeout_s)
        rest = [spawn(i, ["--bootstrap", nodes[0].ready["addrs"][0]]) for i in range(1, lab.n)]
        for n in rest:
            await_ready(n, ready_timeout_s)
        yield nodes
    finally:
        stop_nodes(nodes)


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has used, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _host_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat; idle and iowait are not busy)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


class CpuSampler:
    """Samples, while a swarm runs, the host's busy CPU ticks and the CPU seconds of named processes (the
    nodes, the shaper), so a run can say whether the host had a core free for every stage: on a host with
    fewer cores than busy processes, a stage's idle time is partly time it waited for a core, not for the
    links. A measurement of the environment, not of the run (one /proc read per process and sample)."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2) -> None:
        self.pids = pids  # name -> pid of the processes to account
        self.interval_s = interval_s  # seconds between samples
        self.samples: list[tuple[float, tuple[int, int], dict[str, float | None]]] = []  # (time.time(), host, cpu)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _host_jiffies(), {k: _proc_cpu_s(p) for k, p in self.pids.items()}))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Over the samples spanning [t0, t1]: the host's busy fraction of all its cores, and each process's
        CPU seconds per wall second (1.0 = one core all the time); {} when fewer than two samples span it."""
        inside = [x for x in self.samples if t0 <= x[0] <= t1]
        if len(inside) < 2:
            return {}
        (ta, ha, ca), (tb, hb, cb) = inside[0], inside[-1]
        cpu = {}
        for k in self.pids:
            first, last = ca.get(k), cb.get(k)
            if first is not None and last is not None:
                cpu[k] = round((last - first) / (tb - ta), 4)
        return {"cores": os.cpu_count(), "host_busy_fraction": round((hb[0] - ha[0]) / max(1, hb[1] - ha[1]), 4),
                "cpu_per_wall": cpu, "seconds": round(tb - ta, 2)}


def _per_step(recs: list[dict[str, Any]], key: str) -> float:
    """Mean of a numeric record field over a node's steps, the first (start-up) left out."""
    return sum(r[key] for r in recs[1:]) / max(1, len(recs) - 1)


def _mean_phases(recs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per step of each phase of a replicated node's finish (its records' `phases`)."""
    names = sorted({k for r in recs for k in r.get("phases", {})})
    return {k: round(sum(r.get("phases", {}).get(k, 0.0) for r in recs) / max(1, len(recs)), 4) for k in names}


def summarise(progress: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Busiest-stage utilisation and the tail's tokens/s, first step (start-up) left out. Keys are stages, or nodes
    of a replicated run (ordered by stage: the last is a tail replica; a replicated record's compute is `compute_s`,
    and every replica records every step it applied with the step's tokens)."""
    for recs in progress.values():
        for r in recs:
            r.setdefault("busy_s", r.get("compute_s", 0.0))
            r.setdefault("bytes_out", 0)
    util = {}
    for stage, recs in progress.items():
        recs = sorted(recs, key=lambda r: r["step"])
        wall = recs[-1]["end_time"] - recs[0]["end_time"]
        util[stage] = sum(r["busy_s"] for r in recs[1:]) / wall if wall > 0 else 0.0
    tail = sorted(progress[max(progress)], key=lambda r: r["step"])
    span = tail[-1]["end_time"] - tail[0]["end_time"]
    busy = {s: _per_step(recs, "busy_s") for s, recs in progress.items()}
    out_bytes = {s: _per_step(recs, "bytes_out") for s, recs in progress.items()}
    replicated = {}
    if all("update_s" in r for recs in progress.values() for r in recs):  # a replicated run: updates and bundles
        replicated = {
            "update_s_per_step": {s: _per_step(recs, "update_s") for s, recs in progress.items()},
            **({"compute_cpu_s_per_step": {s: _per_step(recs, "compute_cpu_s") for s, recs in progress.items()},
                "update_cpu_s_per_step": {s: _per_step(recs, "update_cpu_s") for s, recs in progress.items()}}
               if all("compute_cpu_s" in r for recs in progress.values() for r in recs) else {}),
            "contribution_bytes": {s: recs[-1]["contribution_bytes"] for s, recs in progress.items()},
            "stage_of_node": {s: recs[-1]["stage"] for s, recs in progress.items()},
            "phases_per_step": {s: _mean_phases(recs[1:]) for s, recs in progress.items()}}
    return {**replicated, "utilisation": max(util.values()), "busiest_stage": max(util, key=lambda s: util[s]),
            "busy_s_per_step": busy, "bytes_out_per_step": out_bytes,
            "stage_utilisation": util, "tokens_per_s": sum(r["tokens"] for r in tail[1:]) / span,
            "last_train_loss": tail[-1]["loss"],
            "stale_rejected": sum(r.get("stale_rejected", 0) for recs in progress.values() for r in recs)}


def run_schedule(lab: WanLab, schedule: str, staleness: int, steps: int, microbatches: int, mb_size: int,
                 model_path: Path, root: Path, lr: float, corpus: str, grad_clip: float = 0.0,
                 optimizer: str = "adamw", lookahead: float = 1.0, replicas: int = 1,
                 averaging: tuple[int, int] = (6, 4), max_inflight: int | None = None,
                 pipelined_finish: bool = True) -> dict[str, Any]:
    """One swarm run of `schedule` over the emulated links; its summary. replicas > 1: `lab.n // replicas` stages
    of `replicas` nodes each, replicated mode with the step exchange and PowerSGD (`averaging` = rank, bits), each
    sender keeping at most `max_inflight` microbatches at one downstream replica (None: the node's default), and
    async steps finishing side by side (`pipelined_finish`, the node's replicas.pipelined_finish) or one at a time."""
    args = ["--model", str(model_path), "--stages", str(lab.n), "--steps", str(steps), "--microbatches",
            str(microbatches), "--microbatch-size", str(mb_size), "--corpus", corpus, "--threads", "1", "--lr", str(lr),
            "--no-dht", "--checkpoint-every", "0", "--schedule", schedule, "--recipe-grad-clip", str(grad_clip),
            "--max-staleness", str(staleness if schedule == "async" else 0), "--recipe-optimizer", optimizer,
            "--async-lookahead", str(lookahead if schedule == "async" else 1.0),
            "--discovery-discovery-timeout-s", "600", "--runtime-frame-timeout-s", "600"]
    if replicas > 1:
        args[args.index("--stages") + 1] = str(lab.n // replicas)
        args += ["--replicated", "--replica-exchange", "step", "--replica-averaging", "powersgd", "--powersgd-rank",
                 str(averaging[0]), "--powersgd-bits", str(averaging[1]), "--replicas-start-quorum", str(lab.n - 1),
                 "--no-replica-timeout", "600", "--replica-timeout", "120", "--avg-timeout", "60"]
        if max_inflight is not None:
            args += ["--replicas-max-inflight", str(max_inflight)]
        if not pipelined_finish:
            args += ["--no-replicas-pipelined-finish"]
    t0 = time.monotonic()
    with wan_swarm(lab, root, args, ready_timeout_s=600, replicas=replicas) as nodes:
        pids = {f"node{i}_stage{n.stage}": n.proc.pid for i, n in enumerate(nodes)}
        if lab.shaper is not None:
            pids["shaper"] = lab.shaper.pid
        with CpuSampler(pids) as cpu:
            codes = wait_nodes(nodes, 3600)
    if any(codes):
        errs = {n.stage: (n.data_dir / "stderr.log").read_text()[-800:] for n in nodes}
        raise RuntimeError(f"{schedule}: exit codes {codes}: {errs}")
    progress = {i if replicas > 1 else n.stage: read_progress(n.data_dir) for i, n in enumerate(nodes)}
    out = summarise(progress)
    busiest = sorted(progress[out["busiest_stage"]], key=lambda r: r["step"])
    out["host_cpu"] = cpu.window(busiest[0]["end_time"], busiest[-1]["end_time"])  # the utilisation's window
    out["run_s"] = time.monotonic() - t0
    return out


def loss_ratio(model: ModelConfig, staleness: int, steps: int, microbatches: int, mb_size: int, lr: float,
               corpus_name: str, grad_clip: float = 0.0, optimizer: str = "adamw",
               lookahead: float = 1.0) -> dict[str, float]:
    """Validation loss of async (staleness, look-ahead) over gpipe at equal tokens, from the single-process
    references, both arms with `optimizer`."""
    import torch

    from sharding import OptimConfig, build_model, load_corpus, train_reference, validation_loss
    from sharding.delayed import train_delayed

    torch.set_num_threads(1)
    corpus = load_corpus(corpus_name)
    optim = OptimConfig(lr=lr, grad_clip=grad_clip, optimizer=optimizer)

    def val(m: Any) -> float:
        return validation_loss(m, corpus, model.seq_len, VAL_WINDOWS, seed=VAL_SEED)

    sync_model, async_model = build_model(model), build_model(model)
    train_reference(model, optim, steps, microbatches, mb_size, corpus, model=sync_model)
    train_delayed(model, optim, steps, microbatches, mb_size, corpus, staleness, model=async_model,
                  lookahead=lookahead)
    gpipe, delayed = val(sync_model), val(async_model)
    return {"val_loss_gpipe": gpipe, "val_loss_async": delayed, "loss_ratio_async": delayed / gpipe,
            "loss_steps": steps}


def _averaging(steps: int, model: str, rank: int, bits: int, lr: float, dense: str, iterations: int
               ) -> dict[str, Any]:
    """benchmarks/wan_averaging.py's dense (`dense`: dense-bf16 or fp32 dense) vs PowerSGD comparison (loaded from
    beside this script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wan_averaging", Path(__file__).with_name("wan_averaging.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    result: dict[str, Any] = module.compare_averaging(steps=steps, rank=rank, model=model, bits=bits, lr=lr,
                                                     dense=dense, iterations=iterations)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a few minutes on an idle machine)")
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay per link")
    p.add_argument("--rate-mbit", type=float, default=200.0, help="uplink rate per node")
    p.add_argument("--steps", type=int, default=None, help="training steps per schedule run (default 40, quick 5)")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--max-staleness", type=int, default=1, help="async: the staleness bound")
    p.add_argument("--replicas", type=int, default=1,
                   help="nodes per stage: above 1 the swarm runs replicated (step exchange, PowerSGD with "
                        "--averaging-rank / --averaging-bits, head delegation); 1f1b then routes as gpipe does")
    p.add_argument("--loss-steps", type=int, default=None, help="steps of the loss comparison (default 300, quick 60)")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--max-inflight", type=int, default=None,
                   help="--replicas R > 1: microbatches a sender may keep at one downstream replica (the node's "
                        "replicas.max_inflight; default: the node's)")
    p.add_argument("--serial-finish", action="store_true",
                   help="--replicas R > 1, async: each node finishes one step at a time (the node before session 32, "
                        "--no-replicas-pipelined-finish), not a later step's beside an earlier one's")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="the recipe's optimiser, every schedule and both loss arms (recipe.optimizer)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the recipe's lr)")
    p.add_argument("--lookahead", type=float, default=1.0,
                   help="async: the delay correction (training.async_lookahead), swarm and loss arm")
    p.add_argument("--corpus", default="stdlib", help="sharding.load_corpus source")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="global-norm clipping (recipe.grad_clip) in every schedule run and both loss arms; 0 = off")
    p.add_argument("--averaging-steps", type=int, default=None,
                   help="steps of the dense vs PowerSGD replica comparison (default 150, quick 10; 0 skips it)")
    p.add_argument("--averaging-rank", type=int, default=6, help="PowerSGD rank of the replica comparison")
    p.add_argument("--averaging-bits", type=int, choices=POWERSGD_BITS, default=4,
                   help="PowerSGD factors of the replica comparison: 16 (bf16), 8 (int8) or 4 (int4)")
    p.add_argument("--averaging-model", default="wide", help="wan_averaging model: wide (d 256) or tiny")
    p.add_argument("--averaging-iterations", type=int, default=3,
                   help="PowerSGD power iterations per contribution in the replica comparison (powersgd_iterations)")
    p.add_argument("--averaging-dense", choices=("dense-bf16", "dense"), default="dense-bf16",
                   help="the replica comparison's dense arm: bf16 values (the fair baseline) or fp32")
    a = p.parse_args(argv)
    if a.averaging_iterations < 1 or a.averaging_rank < 1:
        p.error(f"--averaging-rank {a.averaging_rank} / --averaging-iterations {a.averaging_iterations}: PowerSGD needs "
                "a rank and an iteration count of at least 1")
    steps = a.steps or (5 if a.quick else 40)
    loss_steps = a.loss_steps or (60 if a.quick else 300)
    schedules = [s for s in a.schedules.split(",") if s]
    link = WanLink(a.delay_ms, a.rate_mbit)
    results: dict[str, dict[str, Any]] = {}
    if a.replicas < 1:
        p.error(f"--replicas {a.replicas}: at least 1 node per stage")
    if a.max_inflight is not None and (a.replicas < 2 or a.max_inflight < 1):
        p.error(f"--max-inflight {a.max_inflight}: a count >= 1, with --replicas 2 or more (replicated mode's cap)")
    with tempfile.TemporaryDirectory(prefix="pmn-bench-wan-") as tmp, WanLab(3 * a.replicas, link) as lab:
        check = check_links(lab, 4 << 20 if a.quick else 16 << 20)
        print(f"link check (node 0 -> node 1): 1-byte round trip {check['rtt_ms']:.1f} ms (want {2 * a.delay_ms:.0f}), "
              f"bulk {check['bulk_mbit_s']:.1f} Mbit/s (want {a.rate_mbit:.0f}) over {check['bulk_bytes']:,} bytes")
        model_path = Path(tmp) / "model.json"
        model_path.write_text(json.dumps(BENCH_MODEL.to_dict()))
        for schedule in schedules:
            results[schedule] = run_schedule(lab, schedule, a.max_staleness, steps, a.microbatches,
                                             a.microbatch_size, model_path, Path(tmp) / schedule, a.lr, a.corpus,
                                             a.grad_clip, a.optimizer, a.lookahead, a.replicas,
                                             (a.averaging_rank, a.averaging_bits), a.max_inflight,
                                             not a.serial_finish)
            r = results[schedule]
            print(f"{schedule}: utilisation {r['utilisation']:.3f} (stage {r['busiest_stage']}), "
                  f"{r['tokens_per_s']:.0f} tokens/s", flush=True)
    losses = loss_ratio(BENCH_MODEL, a.max_staleness, loss_steps, a.microbatches, a.microbatch_size, a.lr, a.corpus,
                        a.grad_clip, a.optimizer, a.lookahead)
    avg_steps = a.averaging_steps if a.averaging_steps is not None else (10 if a.quick else 150)
    averaging = _averaging(avg_steps, a.averaging_model, a.averaging_rank, a.averaging_bits, a.lr, a.averaging_dense,
                           a.averaging_iterations) \
        if avg_steps > 0 else None
    if averaging is not None:
        print(f"replica averaging ({avg_steps} steps, {a.averaging_model} model, lr {a.lr:g}): {a.averaging_dense} vs PowerSGD "
              f"r{a.averaging_rank} {f'int{a.averaging_bits}' if a.averaging_bits < 16 else 'bf16'}: bytes of a full step "
              f"{averaging['replica_compression']:.1f}x less, val loss ratio {averaging['loss_ratio_compressed_avg']:.4f}")
    print(f"model d={BENCH_MODEL.d_model} L={BENCH_MODEL.n_layers} T={BENCH_MODEL.seq_len}, 3 stages x "
          f"{a.replicas} node(s), "
          f"{a.microbatches}x{a.microbatch_size} microbatches, {steps} steps, netem {a.delay_ms:g} ms / "
          f"{a.rate_mbit:g} Mbit/s per uplink, async max_staleness {a.max_staleness} look-ahead {a.lookahead:g}, "
          f"{a.optimizer} lr {a.lr:g}, grad clip {a.grad_clip:g}")
    print(f"{'schedule':<10}{'tokens/s':>10}{'util':>8}{'stage':>7}  per-stage utilisation")
    for s, r in results.items():
        per = " ".join(f"{v:.2f}" for _, v in sorted(r["stage_utilisation"].items()))
        host = r["host_cpu"]
        cpu = " ".join(f"{k} {v:.2f}" for k, v in host.get("cpu_per_wall", {}).items())
        print(f"{s:<10}{r['tokens_per_s']:>10.0f}{r['utilisation']:>8.3f}{r['busiest_stage']:>7}  {per}"
              f"   host busy {host.get('host_busy_fraction', float('nan')):.2f} of {host.get('cores')} cores; "
              f"cores used: {cpu}")
    print(f"val loss at equal tokens ({loss_steps} steps): gpipe {losses['val_loss_gpipe']:.4f}, async "
          f"{losses['val_loss_async']:.4f}, ratio {losses['loss_ratio_async']:.4f}")
    print(json.dumps({
        "utilisation": {s: round(r["utilisation"], 4) for s, r in results.items()},
        "tokens_per_s": {s: round(r["tokens_per_s"], 1) for s, r in results.items()},
        "stage_utilisation": {s: {str(k): round(v, 4) for k, v in r["stage_utilisation"].items()}
                              for s, r in results.items()},
        "stale_rejected": {s: r["stale_rejected"] for s, r in results.items()},
        "busy_s_per_step": {s: {str(k): round(v, 5) for k, v in r["busy_s_per_step"].items()} for s, r in results.items()},
        "bytes_out_per_step": {s: {str(k): round(v) for k, v in r["bytes_out_per_step"].items()}
                               for s, r in results.items()},
        "replicated": {s: {**{key: {k: round(v, 5) for k, v in r[key].items()} for key in (
                               "update_s_per_step", "compute_cpu_s_per_step", "update_cpu_s_per_step") if key in r},
                           **{key: r[key] for key in ("contribution_bytes", "stage_of_node", "phases_per_step")}}
                       for s, r in results.items() if "update_s_per_step" in r},  # node keys: JSON makes them strings
        "replica_compression": None if averaging is None else round(averaging["replica_compression"], 2),
        "loss_ratio_async": round(losses["loss_ratio_async"], 4),
        "loss_ratio_compressed_avg": None if averaging is None else round(averaging["loss_ratio_compressed_avg"], 4),
        "averaging": None if averaging is None else {"steps": avg_steps, "model": a.averaging_model,
                                                     "rank": a.averaging_rank, "bits": a.averaging_bits,
                                                     "dense_baseline": a.averaging_dense,
                                                     "iterations": a.averaging_iterations},
        "val_loss": {"gpipe": round(losses["val_loss_gpipe"], 4), "async": round(losses["val_loss_async"], 4),
                     "steps": loss_steps},
        "goal_utilisation_async": 0.9,
        "emulation": "shaping relay (benchmarks/wan_shaper.py) behind an nftables redirect in the nodes' network "
                     "namespace: per connection direction, rate then delay (tc netem is not in this kernel)",
        "link_check": {k: round(v, 2) for k, v in check.items()},
        "host_cpu": {s: r["host_cpu"] for s, r in results.items()},
        "delay_ms": a.delay_ms, "rate_mbit": a.rate_mbit, "stages": 3, "replicas": a.replicas,
        "max_inflight": (a.max_inflight or ReplicaConfig().max_inflight) if a.replicas > 1 else None,
        "pipelined_finish": not a.serial_finish if a.replicas > 1 else None,
        "max_staleness": a.max_staleness, "steps": steps, "microbatches": a.microbatches,
        "microbatch_size": a.microbatch_size, "model": BENCH_MODEL.to_dict(), "lr": a.lr, "corpus": a.corpus,
        "grad_clip": a.grad_clip, "optimizer": a.optimizer, "lookahead": a.lookahead,
    }))


if __name__ == "__main__":
    main()
