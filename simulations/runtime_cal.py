"""Micro-measurements of the node runtime that the local-swarm simulation takes as inputs.

- `measure_contention`: the real stage code (`calibrate.stage_ops`) timed in one process per stage,
  all running at the same time (the swarm's layout: P processes on this host's cores, torch threads
  split), optionally against the same code timed alone: compute time under process contention.
- `measure_transport`: two real py-libp2p hosts on 127.0.0.1 (TCP + Noise + yamux) running the
  node's `/pmn/act/1.0.0` channel (credits, header checks, digest, ack, credit): connect +
  handshake seconds, the round trip of one frame (credits = 1), the CPU seconds one frame costs
  both ends together (pipelined), and the hand-off cost of one `trio.to_thread.run_sync`.
None of these look at the swarm run they are later compared with.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict
from typing import Any

from .calibrate import CalibrationConfig, stage_ops


def _contended_worker(cal_dict: dict[str, Any], index: int, repeats: int, barrier: Any, queue: Any) -> None:
    import torch

    cal = CalibrationConfig(**cal_dict)
    torch.set_num_threads(cal.threads)
    ops = stage_ops(cal, [index])[0]
    for _ in range(2):  # warm-up, untimed
        ops.forward()
        ops.backward()
    barrier.wait()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.thread_time(), time.perf_counter()
        ops.forward()
        ops.backward()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    queue.put((index, (float(statistics.median(wall)), float(sum(cpu) / sum(wall)))))


def _run_concurrently(cal: CalibrationConfig, indices: list[int], repeats: int) -> dict[int, tuple[float, float]]:
    """Per listed stage, all running at once in their own process: (median fwd+bwd wall seconds,
    CPU share = its thread's CPU seconds / wall seconds)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(indices))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_contended_worker, args=(asdict(cal), i, repeats, barrier, queue)) for i in indices]
    for p in procs:
        p.start()
    try:
        out = dict(queue.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    return out


def measure_contention(cal: CalibrationConfig, repeats: int = 12, alone: bool = False) -> dict[str, Any]:
    """Stage compute seconds when every stage of `cal` runs at once, one process each (the swarm's layout).

    Returns `together_s` (stage -> median fwd+bwd seconds, all stages at once) and, with `alone=True`,
    `alone_s` (each stage by itself in its own process) and `factor` = median of together / alone.
    """
    cal = cal.validate()
    indices = list(range(cal.num_stages))
    res = _run_concurrently(cal, indices, repeats)
    cores = os.cpu_count() or 1
    share = statistics.mean(v[1] for v in res.values())
    out: dict[str, Any] = {
        "processes": len(indices),
        "together_s": {str(k): v[0] for k, v in sorted(res.items())},
        "cpu_share": share,
        "background_load": background_load(share, len(indices), cores),  # thread-fair reading
        "how": f"stage fwd+bwd (calibrate.stage_ops, {cal.threads} torch thread(s)) in {len(indices)} processes "
               f"at once, median of {repeats} after 2 untimed; cpu_share = thread CPU / wall, mean over the "
               f"processes; background_load = cores / cpu_share - processes (>= 0); cores here {cores}",
    }
    if alone:
        solo: dict[int, tuple[float, float]] = {}
        for i in indices:
            solo.update(_run_concurrently(cal, [i], repeats))
        out["alone_s"] = {str(k): v[0] for k, v in sorted(solo.items())}
        out["factor"] = float(statistics.median(res[i][0] / solo[i][0] for i in indices))
    return out


def background_load(cpu_share: float, busy: int, cores: int) -> float:
    """Other runnable threads on the host implied by `busy` threads each getting `cpu_share` of a core
    under fair sharing (share = cores / (busy + background) when that is < 1); 0 when share is ~1."""
    if not 0 < cpu_share <= 1.5 or busy < 1 or cores < 1:
        raise ValueError(f"cpu_share={cpu_share!r}, busy={busy!r}, cores={cores!r}: need 0 < share, busy, cores >= 1")
    return max(0.0, cores / min(cpu_share, 1.0) - busy)


async def _transport(payload_len: int, window_len: int, n: int) -> dict[str, float]:
    import multiaddr
    import trio

    from node.config import TransportConfig
    from node.net.host import full_addrs, make_host
    from node.net.identity import identity_from_secret
    from node.net.running import run_host
    from node.wire import frames
    from node.wire.channel import ActEndpoint, LocalInfo

    spec_hash = b"\x42" * 32
    id_bytes = 2
    seq = 1
    batch = max(1, window_len // (id_bytes * (seq + 1)))
    spec = frames.FrameSpec(spec_hash=spec_hash, codec=frames.CodecId.DENSE, microbatch_size=batch, seq_len=seq, d_model=1,
                       bytes_per_token=max(1, payload_len // batch), id_bytes=id_bytes, max_frame_bytes=1 << 26)
    payload = os.urandom(spec.payload_len)
    window = bytes(spec.window_len)
    out: dict[str, float] = {}
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    for credits in (1, 4):
        cfg = TransportConfig(credits=credits)
        h0 = make_host(identity_from_secret((201).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
        h1 = make_host(identity_from_secret((202).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
        async with run_host(h0, la), run_host(h1, la), trio.open_nursery() as nursery:
            a = ActEndpoint(h0, local=LocalInfo(spec_hash, 0, 2, ""), frame_spec=spec, cfg=cfg)
            b = ActEndpoint(h1, local=LocalInfo(spec_hash, 1, 2, ""), frame_spec=spec, cfg=cfg)
            t0 = time.perf_counter()
            ch = await a.open(full_addrs(h1)[0])
            if credits == 1:
                out["connect_s"] = time.perf_counter() - t0
            nursery.start_soon(ch.run_reader)
            inbound = await b.incoming.receive()

            async def consume(k: int, inbound: Any = inbound) -> None:
                for _ in range(k):
                    await inbound.recv_data(60)

            async with trio.open_nursery() as warm:  # window growth, first frames
                warm.start_soon(consume, 4)
                for i in range(4):
                    await ch.send_data(frames.Kind.ACTIVATION, 0, i, payload, window)
            await ch.wait_acked()
            t0, c0 = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as inner:
                inner.start_soon(consume, n)
                for i in range(n):
                    await ch.send_data(frames.Kind.ACTIVATION, 1, i, payload, window)
                await ch.wait_acked()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if credits == 1:
                out["frame_rtt_s"] = wall / n
            else:
                out["frame_cpu_s"] = cpu / n
                out["frame_pipelined_s"] = wall / n
            nursery.cancel_scope.cancel()
    samples = []
    for _ in range(200):
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(lambda: None)
        samples.append(time.perf_counter() - t0)
    out["thread_dispatch_s"] = float(statistics.median(samples))
    return out


def measure_transport(payload_len: int, window_len: int, n_frames: int = 200) -> dict[str, Any]:
    """py-libp2p channel costs for frames of this size (see the module docstring)."""
    import trio

    res: dict[str, Any] = dict(trio.run(_transport, payload_len, window_len, n_frames))
    res["payload_len"], res["window_len"], res["frames"] = payload_len, window_len, n_frames
    res["how"] = ("two py-libp2p hosts in one process on 127.0.0.1, node.wire.channel.ActEndpoint (TCP+Noise+yamux, "
                  "credits, digest, ack): connect_s = connect+stream+HELLO; frame_rtt_s = wall per frame with "
                  "credits=1; frame_cpu_s = process CPU per frame (both ends) with credits=4; "
                  "thread_dispatch_s = median trio.to_thread.run_sync(no-op)")
    return res
