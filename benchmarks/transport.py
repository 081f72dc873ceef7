"""Activation frames over the node's own `/pmn/act/1.0.0` libp2p stream vs a raw TCP socket on loopback.

Runs are interleaved (one round = every path once), repeated; figures are medians over rounds.
Paths, each with both ends in one process:

* libp2p `/pmn/act/1.0.0`: the full node path: TCP + Noise + yamux with the node's transport
  tuning, credits, header checks before the body, BLAKE3 digest check, per-frame ack;
* libp2p, py-libp2p defaults: the same channel on stock py-libp2p transport settings;
* libp2p stream, bytes only: the same frame bytes written to a plain libp2p stream (tuned
  Noise + yamux, no channel work): the transport alone;
* raw TCP, bytes only: the frame bytes over a bare trio TCP socket. **`tcp_MBps` and `ratio` use
  this one** (the issue's goal: `ratio = libp2p_MBps / tcp_MBps >= 0.3`);
* raw TCP, same frame work: digest on send, header checks + digest check on receive over a bare
  socket (`tcp_same_work_MBps`, `ratio_same_work`), isolating the transport from the app work.

and with sender and receiver in two processes, as two nodes are: the full channel and bare TCP
(`*_two_processes` keys). Two processes speed bare TCP up more than the channel, so their ratio is
lower; `ratio` stays the one-process figure.

Last line: a JSON object with libp2p_MBps, tcp_MBps, ratio, cpu_s_per_GiB (CPU seconds of both
ends of the libp2p path, worker threads included, per GiB moved) and the extra figures, among them
the floor of the libp2p path's CPU: it moves the same bytes over TCP (tcp_cpu_s_per_GiB) and on
top hashes them (`hash_cpu_s_per_GiB`: the BLAKE3 frame digest, computed by the sender and checked
by the receiver) and encrypts and decrypts them (`noise_cpu_s_per_GiB`: ChaCha20-Poly1305), both
timed alone here. `ratio_cpu_ceiling` = tcp / (tcp + hash + noise) is the ratio a run that gets
one core's worth of CPU could reach even if no Python, copy or thread hop cost anything; a run
goes above it only where its worker threads find otherwise idle cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import multiaddr  # noqa: E402
import trio  # noqa: E402
from libp2p.abc import INetStream  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402

from node.config import TransportConfig  # noqa: E402
from node.net.host import full_addrs, make_host, parse_peer_addr  # noqa: E402
from node.net.identity import identity_from_secret  # noqa: E402
from node.net.running import run_host  # noqa: E402
from node.net.transport.heap import keep_large_buffers_in_heap  # noqa: E402
from node.net.transport.io import grow_receive_window  # noqa: E402
from node.wire import frames  # noqa: E402
from node.wire.channel import ActEndpoint, LocalInfo, digest_off_loop  # noqa: E402

SPEC_HASH = b"\x42" * 32


def frame_spec(batch: int, seq: int, d_model: int, max_frame: int) -> frames.FrameSpec:
    """Dense fp32 activations of a (batch, seq, d_model) boundary."""
    return frames.FrameSpec(spec_hash=SPEC_HASH, codec=frames.CodecId.DENSE, microbatch_size=batch, seq_len=seq,
                       d_model=d_model, bytes_per_token=4 * d_model, id_bytes=2, max_frame_bytes=max_frame)


async def bench_libp2p(spec: frames.FrameSpec, n: int, credits: int, yamux_frame: int, tuned: bool = True,
                       read_bytes: int = TransportConfig.tcp_read_bytes,
                       hash_thread_bytes: int = TransportConfig.hash_thread_bytes) -> tuple[float, float, int]:
    """(seconds, cpu seconds, bytes) to move n activation frames over libp2p.

    tuned=False runs py-libp2p's defaults (64 KiB yamux frames, 256 KiB stream window, plain reads).
    """
    cfg = TransportConfig(max_frame_bytes=spec.max_frame_bytes, credits=credits, yamux_frame_bytes=yamux_frame,
                          tcp_read_bytes=read_bytes, hash_thread_bytes=hash_thread_bytes)
    if not tuned:
        cfg.yamux_frame_bytes, cfg.stream_window_bytes, cfg.tcp_read_bytes = 64 * 1024, 256 * 1024, 0
    payload = os.urandom(spec.payload_len)
    window = bytes(spec.window_len)  # token ids (zeros are valid)
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    h0 = make_host(identity_from_secret((101).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
    h1 = make_host(identity_from_secret((102).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
    result: list[float] = []
    async with run_host(h0, la), run_host(h1, la), trio.open_nursery() as nursery:
        sender = ActEndpoint(h0, local=LocalInfo(SPEC_HASH, 0, 2, ""), frame_spec=spec, cfg=cfg)
        receiver = ActEndpoint(h1, local=LocalInfo(SPEC_HASH, 1, 2, ""), frame_spec=spec, cfg=cfg)
        ch = await sender.open(full_addrs(h1)[0])
        nursery.start_soon(ch.run_reader)
        inbound = await receiver.incoming.receive()

        async def consume() -> None:
            for _ in range(n):
                await inbound.recv_data(60)

        # warm-up (window growth, first frames)
        async with trio.open_nursery() as warm:
            warm.start_soon(consume_n, inbound, 4)
            for i in range(4):
                await ch.send_data(frames.Kind.ACTIVATION, 0, i, payload, window)
        await ch.wait_acked()
        t0, c0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as inner:
            inner.start_soon(consume)
            for i in range(n):
                await ch.send_data(frames.Kind.ACTIVATION, 1, i, payload, window)
            await ch.wait_acked()
        result = [time.perf_counter() - t0, time.process_time() - c0]
        nursery.cancel_scope.cancel()
    frame_bytes = frames.HEADER_SIZE + spec.window_len + spec.payload_len
    return result[0], result[1], n * frame_bytes


STREAM_PROTO = TProtocol("/pmn/bench-bytes/1.0.0")


async def bench_libp2p_stream(spec: frames.FrameSpec, n: int, yamux_frame: int, window: int,
                              read_bytes: int = TransportConfig.tcp_read_bytes) -> tuple[float, float, int]:
    """(seconds, cpu seconds, bytes) to write the frame bytes n times to a plain tuned libp2p stream."""
    raw = os.urandom(frames.HEADER_SIZE + spec.window_len + spec.payload_len)
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    h0 = make_host(identity_from_secret((103).to_bytes(32, "big")), yamux_frame, read_bytes)
    h1 = make_host(identity_from_secret((104).to_bytes(32, "big")), yamux_frame, read_bytes)
    total = n * len(raw)
    done = trio.Event()
    out: list[float] = []

    async def handler(stream: INetStream) -> None:
        await grow_receive_window(stream, window)
        got = 0
        while got < total:
            chunk = await stream.read(1 << 22)
            if not chunk:
                break
            got += len(chunk)
        await stream.write(b"k")
        done.set()

    async with run_host(h0, la), run_host(h1, la):
        h1.set_stream_handler(STREAM_PROTO, handler)
        info = parse_peer_addr(full_addrs(h1)[0])
        await h0.connect(info)
        stream = await h0.new_stream(info.peer_id, [STREAM_PROTO])
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            await stream.write(raw)
        await done.wait()
        assert await stream.read(1) == b"k"
        out = [time.perf_counter() - t0, time.process_time() - c0]
    return out[0], out[1], total


async def consume_n(ch: object, k: int) -> None:
    for _ in range(k):
        await ch.recv_data(60)  # type: ignore[attr-defined]


async def bench_tcp(spec: frames.FrameSpec, n: int, app_work: bool = True) -> tuple[float, float, int]:
    """(seconds, cpu seconds, bytes) to move the same frames over a plain trio TCP socket.

    app_work=True does the node's application work on both ends (BLAKE3 digest on send, header
    checks + digest verification on receive, on the loop or off it by the same rule as the channel) so only
    the transport differs; app_work=False just pushes the bytes.
    """
    payload = os.urandom(spec.payload_len)
    window = bytes(spec.window_len)
    size = frames.HEADER_SIZE + len(window) + len(payload)
    cfg = TransportConfig()  # the node's rule for hashing in a worker thread or on the loop
    done = trio.Event()
    out: list[float] = []

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        count = 0
        while count < n:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= size:
                if app_work:
                    h = frames.decode_header(bytes(buf[: frames.HEADER_SIZE]), spec.max_frame_bytes)
                    frames.check_data_header(h, spec)
                    body = bytes(buf[frames.HEADER_SIZE:size])
                    if cfg.hashes_in_thread(len(body)):
                        await trio.to_thread.run_sync(frames.split_body, h, body)
                    else:
                        frames.split_body(h, body)
                del buf[:size]
                count += 1
        await stream.send_all(b"k")
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        raw = frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=payload, window=window,
                             codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32, shape=spec.shape)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            if app_work:
                dig = await digest_off_loop(window, payload, cfg.hashes_in_thread(len(window) + len(payload)))
                h = frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=SPEC_HASH, stage=0, step=1, microbatch=i,
                                  codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32, shape=spec.shape,
                                  window_len=len(window), payload_len=len(payload), digest=dig)
                raw = b"".join((frames.encode_header(h), window, payload))
            await client.send_all(raw)
        await client.receive_some(1)
        await done.wait()
        out = [time.perf_counter() - t0, time.process_time() - c0]
        await client.aclose()
        nursery.cancel_scope.cancel()
    return out[0], out[1], n * size


# -- two processes: the sender and the receiver are separate OS processes, as two nodes are ----------


@dataclass(frozen=True)
class TwoProcRun:
    """What both ends of a two-process run need to know."""

    path: str  # "lib" (the full /pmn/act/1.0.0 channel) or "tcp" (bare TCP, bytes only)
    batch: int  # frame_spec dimensions
    seq: int
    d_model: int
    n: int  # timed frames
    credits: int  # channel credits (lib)
    yamux_frame: int  # tuned yamux frame size (lib)
    read_bytes: int  # tuned TCP read-ahead (lib)
    hash_thread_bytes: int = TransportConfig.hash_thread_bytes  # bodies hashed in a worker thread from this size (lib)


def _spec_of(run: TwoProcRun) -> frames.FrameSpec:
    return frame_spec(run.batch, run.seq, run.d_model, 64 * 1024 * 1024)


def _lib_cfg(run: TwoProcRun) -> TransportConfig:
    return TransportConfig(max_frame_bytes=_spec_of(run).max_frame_bytes, credits=run.credits,
                           yamux_frame_bytes=run.yamux_frame, tcp_read_bytes=run.read_bytes,
                           hash_thread_bytes=run.hash_thread_bytes)


WARMUP_FRAMES = 4  # lib runs: frames sent before timing starts (window growth, first-frame costs)


async def _receiver(run: TwoProcRun, out: Any, stop: Any) -> None:
    """Receiving end: report where to connect, take the frames, report CPU seconds spent on the timed ones."""
    spec = _spec_of(run)
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    if run.path == "tcp":
        size = frames.HEADER_SIZE + spec.window_len + spec.payload_len
        done = trio.Event()

        async def handler(stream: trio.SocketStream) -> None:
            c0, got = time.process_time(), 0
            while got < run.n * size:
                chunk = await stream.receive_some(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
            out.put(("receiver_cpu", time.process_time() - c0))
            await stream.send_all(b"k")
            done.set()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            out.put(("addr", str(listeners[0].socket.getsockname()[1])))
            await done.wait()
            await trio.to_thread.run_sync(stop.wait, 120)
            nursery.cancel_scope.cancel()
        return
    cfg = _lib_cfg(run)
    h1 = make_host(identity_from_secret((112).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
    async with run_host(h1, la):
        receiver = ActEndpoint(h1, local=LocalInfo(SPEC_HASH, 1, 2, ""), frame_spec=spec, cfg=cfg)
        out.put(("addr", full_addrs(h1)[0]))
        inbound = await receiver.incoming.receive()
        await consume_n(inbound, WARMUP_FRAMES)
        c0 = time.process_time()
        await consume_n(inbound, run.n)
        out.put(("receiver_cpu", time.process_time() - c0))
        await trio.to_thread.run_sync(stop.wait, 120)  # keep serving until the sender has every ack


async def _sender(run: TwoProcRun, addr: str, out: Any) -> None:
    """Sending end: time the frames until the receiver has acknowledged (lib) or confirmed (tcp) all of them."""
    spec = _spec_of(run)
    payload, window = os.urandom(spec.payload_len), bytes(spec.window_len)
    if run.path == "tcp":
        raw = frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=payload, window=window,
                             codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32, shape=spec.shape)
        client = await trio.open_tcp_stream("127.0.0.1", int(addr))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(run.n):
            await client.send_all(raw)
        await client.receive_some(1)
        out.put(("sender", (time.perf_counter() - t0, time.process_time() - c0, run.n * len(raw))))
        await client.aclose()
        return
    cfg = _lib_cfg(run)
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    h0 = make_host(identity_from_secret((111).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
    async with run_host(h0, la), trio.open_nursery() as nursery:
        sender = ActEndpoint(h0, local=LocalInfo(SPEC_HASH, 0, 2, ""), frame_spec=spec, cfg=cfg)
        ch = await sender.open(addr)
        nursery.start_soon(ch.run_reader)
        for i in range(WARMUP_FRAMES):
            await ch.send_data(frames.Kind.ACTIVATION, 0, i, payload, window)
        await ch.wait_acked()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(run.n):
            await ch.send_data(frames.Kind.ACTIVATION, 1, i, payload, window)
        await ch.wait_acked()
        frame_bytes = frames.HEADER_SIZE + spec.window_len + spec.payload_len
        out.put(("sender", (time.perf_counter() - t0, time.process_time() - c0, run.n * frame_bytes)))
        nursery.cancel_scope.cancel()


def _end_main(role: str, run: TwoProcRun, out: Any, stop: Any, addr: str = "") -> None:
    """Entry point of one end's process."""
    if run.read_bytes > 0:  # the same process-wide heap settings a tuned node's make_host makes
        keep_large_buffers_in_heap()
    try:
        if role == "receiver":
            trio.run(_receiver, run, out, stop)
        else:
            trio.run(_sender, run, addr, out)
    except BaseException as exc:  # reported to the parent, which raises it
        out.put(("error", f"{role}: {exc!r}"))


def bench_two_processes(run: TwoProcRun, timeout_s: float = 300.0) -> tuple[float, float, int]:
    """(seconds, cpu seconds of both ends, bytes): the path with its sender and receiver in two processes."""
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    receiver = ctx.Process(target=_end_main, args=("receiver", run, out, stop), daemon=True)
    receiver.start()
    procs = [receiver]
    got: dict[str, Any] = {}
    try:
        while "sender" not in got or "receiver_cpu" not in got:
            key, value = out.get(timeout=timeout_s)
            if key == "error":
                raise RuntimeError(value)
            got[key] = value
            if key == "addr":
                sender = ctx.Process(target=_end_main, args=("sender", run, out, stop, value), daemon=True)
                sender.start()
                procs.append(sender)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    seconds, sender_cpu, nbytes = got["sender"]
    return seconds, sender_cpu + got["receiver_cpu"], nbytes


def primitive_cpu(spec: frames.FrameSpec, n: int) -> tuple[float, float]:
    """(BLAKE3 digest CPU s/GiB at both ends, Noise ChaCha20-Poly1305 encrypt + decrypt CPU s/GiB), timed alone."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    window, payload = bytes(spec.window_len), os.urandom(spec.payload_len)
    size = frames.HEADER_SIZE + len(window) + len(payload)
    c0 = time.process_time()
    for _ in range(n):
        frames.digest(window, payload)
    hash_s = 2 * (time.process_time() - c0)  # sender computes it, receiver checks it
    aead, nonce, plain = ChaCha20Poly1305(os.urandom(32)), bytes(12), memoryview(payload)
    step = 65535 - 16  # plaintext bytes per Noise message
    sealed = [aead.encrypt(nonce, plain[i : i + step], None) for i in range(0, len(plain), step)]
    c0 = time.process_time()
    for _ in range(n):
        for i in range(0, len(plain), step):
            aead.encrypt(nonce, plain[i : i + step], None)
        for msg in sealed:
            aead.decrypt(nonce, msg, None)
    noise_s = time.process_time() - c0
    gib = n * size / 2**30
    return hash_s / gib, noise_s / gib


def median_rate(runs: list[tuple[float, float, int]]) -> tuple[float, float]:
    """(MB/s, cpu s/GiB) medians over runs."""
    rates = sorted(b / t / 1e6 for t, _, b in runs)
    cpus = sorted(c / (b / 2**30) for _, c, b in runs)
    return rates[len(rates) // 2], cpus[len(cpus) // 2]


def main() -> None:
    cfg = TransportConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer frames and rounds (< 60 s)")
    p.add_argument("--frames", type=int, default=None, help="frames per libp2p run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--credits", type=int, default=cfg.credits)
    p.add_argument("--yamux-frame", type=int, default=cfg.yamux_frame_bytes, help="node default from TransportConfig")
    p.add_argument("--read-bytes", type=int, default=cfg.tcp_read_bytes, help="node default from TransportConfig")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each runs every path once)")
    a = p.parse_args()
    n = a.frames or (100 if a.quick else 300)
    n_tcp = 4 * n  # bare TCP is ~10x faster: more frames so its timing is not dominated by noise
    reps = a.repeats
    spec = frame_spec(a.batch, a.seq, a.d_model, 64 * 1024 * 1024)
    if a.read_bytes > 0:  # same process-wide heap settings for every path (TCP ones too), as a tuned node has
        keep_large_buffers_in_heap()
    keys = ("lib2", "tcp2", "lib", "default", "stream", "tcp", "work")
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in keys}
    two = functools.partial(TwoProcRun, batch=a.batch, seq=a.seq, d_model=a.d_model, credits=a.credits,
                            yamux_frame=a.yamux_frame, read_bytes=a.read_bytes)
    for _ in range(reps):
        runs["lib2"].append(bench_two_processes(two(path="lib", n=n)))
        runs["tcp2"].append(bench_two_processes(two(path="tcp", n=n_tcp)))
        runs["default"].append(trio.run(bench_libp2p, spec, n, a.credits, a.yamux_frame, False))
        runs["lib"].append(trio.run(bench_libp2p, spec, n, a.credits, a.yamux_frame, True, a.read_bytes))
        runs["stream"].append(trio.run(bench_libp2p_stream, spec, n, a.yamux_frame, cfg.stream_window_bytes,
                                       a.read_bytes))
        runs["tcp"].append(trio.run(bench_tcp, spec, n_tcp, False))
        runs["work"].append(trio.run(bench_tcp, spec, n, True))
    prim = sorted(primitive_cpu(spec, 20) for _ in range(reps))[reps // 2]
    rate = {k: median_rate(v) for k, v in runs.items()}
    lib_mbps, cpu_per_gib = rate["lib2"]
    tcp_mbps = rate["tcp2"][0]
    lib1_mbps, tcp1_mbps, work_mbps = rate["lib"][0], rate["tcp"][0], rate["work"][0]
    frame_bytes = frames.HEADER_SIZE + spec.window_len + spec.payload_len
    print(f"{'path (medians of ' + str(reps) + ')':<36}{'MB/s':>9}{'CPU s/GiB':>11}{'vs TCP':>8}{'frames':>8}")
    print("two processes (sender and receiver are separate processes, as two nodes are):")
    for label, key, base in (("libp2p /pmn/act/1.0.0", "lib2", tcp_mbps), ("raw TCP, bytes only", "tcp2", tcp_mbps)):
        mbps, cpu = rate[key]
        print(f"  {label:<34}{mbps:>9.1f}{cpu:>11.2f}{mbps / base:>8.3f}{n_tcp if key == 'tcp2' else n:>8}")
    print("one process (both ends share one interpreter and its GIL):")
    rows = [("libp2p /pmn/act/1.0.0", "lib"), ("libp2p, py-libp2p defaults", "default"),
            ("libp2p stream, bytes only", "stream"), ("raw TCP, bytes only", "tcp"), ("raw TCP, same frame work", "work")]
    for label, key in rows:
        mbps, cpu = rate[key]
        sent = n_tcp if key == "tcp" else n
        print(f"  {label:<34}{mbps:>9.1f}{cpu:>11.2f}{mbps / tcp1_mbps:>8.3f}{sent:>8}")
    print(f"frames of {frame_bytes / 2**20:.2f} MiB, yamux frames {a.yamux_frame} B, read-ahead {a.read_bytes} B, "
          f"credits {a.credits}; CPU = both ends, worker threads included")
    ceiling = rate["tcp"][1] / (rate["tcp"][1] + prim[0] + prim[1])
    print(f"CPU floor of the libp2p path: TCP {rate['tcp'][1]:.2f} + BLAKE3 digests {prim[0]:.2f} + Noise crypto "
          f"{prim[1]:.2f} s/GiB; in one process (one core's worth of CPU) the ratio cannot exceed {ceiling:.3f}")
    print(json.dumps({
        "libp2p_MBps": round(lib1_mbps, 1), "tcp_MBps": round(tcp1_mbps, 1), "ratio": round(lib1_mbps / tcp1_mbps, 3),
        "cpu_s_per_GiB": round(rate["lib"][1], 2),
        "libp2p_two_processes_MBps": round(lib_mbps, 1), "tcp_two_processes_MBps": round(tcp_mbps, 1),
        "ratio_two_processes": round(lib_mbps / tcp_mbps, 3), "cpu_two_processes_s_per_GiB": round(cpu_per_gib, 2),
        "tcp_same_work_MBps": round(work_mbps, 1), "ratio_same_work": round(lib1_mbps / work_mbps, 3),
        "libp2p_stream_MBps": round(rate["stream"][0], 1), "ratio_stream": round(rate["stream"][0] / tcp1_mbps, 3),
        "stream_cpu_s_per_GiB": round(rate["stream"][1], 2),
        "libp2p_untuned_MBps": round(rate["default"][0], 1), "untuned_cpu_s_per_GiB": round(rate["default"][1], 2),
        "tcp_cpu_s_per_GiB": round(rate["tcp"][1], 2), "hash_cpu_s_per_GiB": round(prim[0], 2),
        "noise_cpu_s_per_GiB": round(prim[1], 2), "ratio_cpu_ceiling": round(ceiling, 3),
        "frame_bytes": frame_bytes, "frames": n, "tcp_frames": n_tcp, "yamux_frame_bytes": a.yamux_frame,
        "read_bytes": a.read_bytes, "credits": a.credits, "repeats": reps}))


if __name__ == "__main__":
    main()
