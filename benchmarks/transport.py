"""Activation frames over the node's own `/pmn/act/1.0.0` libp2p stream vs a raw TCP socket on loopback.

Both runs move the same encoded frames (header + token window + payload), one sender and one
receiver in the same process. The libp2p run goes through the full node path: Noise + yamux,
credits, header checks before the body, sha256 digest check, per-frame ack. `tcp_MBps` does the
same application work (digest on send, header checks + digest check on receive) over a plain
socket, so the ratio isolates the transport; `tcp_bytes_only_MBps` only pushes bytes. Last line: a JSON object with libp2p_MBps, tcp_MBps, ratio, cpu_s_per_GiB.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import multiaddr  # noqa: E402
import trio  # noqa: E402

from node import frames as F  # noqa: E402
from node.channel import ActEndpoint, LocalInfo  # noqa: E402
from node.config import TransportConfig  # noqa: E402
from node.host import full_addrs, make_host  # noqa: E402
from node.identity import identity_from_secret  # noqa: E402

SPEC_HASH = b"\x42" * 32


def frame_spec(batch: int, seq: int, d_model: int, max_frame: int) -> F.FrameSpec:
    """Dense fp32 activations of a (batch, seq, d_model) boundary."""
    return F.FrameSpec(spec_hash=SPEC_HASH, codec=F.Codec.DENSE, microbatch_size=batch, seq_len=seq,
                       d_model=d_model, bytes_per_token=4 * d_model, id_bytes=2, max_frame_bytes=max_frame)


async def bench_libp2p(spec: F.FrameSpec, n: int, credits: int, yamux_frame: int,
                       tuned: bool = True) -> tuple[float, float, int]:
    """(seconds, cpu seconds, bytes) to move n activation frames over libp2p.

    tuned=False runs py-libp2p's defaults (64 KiB yamux frames, 256 KiB stream window, plain reads).
    """
    cfg = TransportConfig(max_frame_bytes=spec.max_frame_bytes, credits=credits, yamux_frame_bytes=yamux_frame)
    if not tuned:
        cfg.yamux_frame_bytes, cfg.stream_window_bytes, cfg.tcp_read_bytes = 64 * 1024, 256 * 1024, 0
    payload = os.urandom(spec.payload_len)
    window = bytes(spec.window_len)  # token ids (zeros are valid)
    la = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    h0 = make_host(identity_from_secret((101).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
    h1 = make_host(identity_from_secret((102).to_bytes(32, "big")), cfg.yamux_frame_bytes, cfg.tcp_read_bytes)
    result: list[float] = []
    async with h0.run(listen_addrs=la), h1.run(listen_addrs=la), trio.open_nursery() as nursery:
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
                await ch.send_data(F.Kind.ACTIVATION, 0, i, payload, window)
        await ch.wait_acked()
        t0, c0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as inner:
            inner.start_soon(consume)
            for i in range(n):
                await ch.send_data(F.Kind.ACTIVATION, 1, i, payload, window)
            await ch.wait_acked()
        result = [time.perf_counter() - t0, time.process_time() - c0]
        nursery.cancel_scope.cancel()
    frame_bytes = F.HEADER_SIZE + spec.window_len + spec.payload_len
    return result[0], result[1], n * frame_bytes


async def consume_n(ch: object, k: int) -> None:
    for _ in range(k):
        await ch.recv_data(60)  # type: ignore[attr-defined]


async def bench_tcp(spec: F.FrameSpec, n: int, app_work: bool = True) -> tuple[float, float, int]:
    """(seconds, cpu seconds, bytes) to move the same frames over a plain trio TCP socket.

    app_work=True does the node's application work on both ends (sha256 digest on send, header
    checks + digest verification on receive, hashing off the loop like the channel does) so only
    the transport differs; app_work=False just pushes the bytes.
    """
    payload = os.urandom(spec.payload_len)
    window = bytes(spec.window_len)
    size = F.HEADER_SIZE + len(window) + len(payload)
    done = trio.Event()
    out: list[float] = []

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        frames = 0
        while frames < n:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= size:
                if app_work:
                    h = F.decode_header(bytes(buf[: F.HEADER_SIZE]), spec.max_frame_bytes)
                    F.check_data_header(h, spec)
                    await trio.to_thread.run_sync(F.split_body, h, bytes(buf[F.HEADER_SIZE:size]))
                del buf[:size]
                frames += 1
        await stream.send_all(b"k")
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        raw = F.encode_frame(F.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=payload, window=window,
                             codec=F.Codec.DENSE, dtype=F.Dtype.FLOAT32, shape=spec.shape)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            if app_work:
                dig = await trio.to_thread.run_sync(F.digest, window, payload)
                h = F.FrameHeader(kind=F.Kind.ACTIVATION, spec_hash=SPEC_HASH, stage=0, step=1, microbatch=i,
                                  codec=F.Codec.DENSE, dtype=F.Dtype.FLOAT32, shape=spec.shape,
                                  window_len=len(window), payload_len=len(payload), digest=dig)
                raw = b"".join((F.encode_header(h), window, payload))
            await client.send_all(raw)
        await client.receive_some(1)
        await done.wait()
        out = [time.perf_counter() - t0, time.process_time() - c0]
        await client.aclose()
        nursery.cancel_scope.cancel()
    return out[0], out[1], n * size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer frames (< 60 s)")
    p.add_argument("--frames", type=int, default=None, help="frames per run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--credits", type=int, default=4)
    p.add_argument("--yamux-frame", type=int, default=256 * 1024)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    n = a.frames or (100 if a.quick else 300)
    reps = 1 if a.quick else a.repeats
    spec = frame_spec(a.batch, a.seq, a.d_model, 64 * 1024 * 1024)
    lib, tcp, bare, default = [], [], [], []
    for _ in range(reps):
        default.append(trio.run(bench_libp2p, spec, n, a.credits, a.yamux_frame, False))
        lib.append(trio.run(bench_libp2p, spec, n, a.credits, a.yamux_frame))
        tcp.append(trio.run(bench_tcp, spec, n, True))
        bare.append(trio.run(bench_tcp, spec, n, False))
    lib_s, lib_cpu, nbytes = sorted(lib)[len(lib) // 2]
    tcp_s, _, _ = sorted(tcp)[len(tcp) // 2]
    bare_s, _, _ = sorted(bare)[len(bare) // 2]
    bare_mbps = nbytes / bare_s / 1e6
    def_s, _, _ = sorted(default)[len(default) // 2]
    def_mbps = nbytes / def_s / 1e6
    lib_mbps, tcp_mbps = nbytes / lib_s / 1e6, nbytes / tcp_s / 1e6
    cpu_per_gib = lib_cpu / (nbytes / 2**30)
    frame_mib = nbytes / n / 2**20
    print(f"{'path':<28}{'MB/s':>10}{'s':>9}{'frames':>8}{'MiB/frame':>11}")
    print(f"{'libp2p /pmn/act/1.0.0':<28}{lib_mbps:>10.1f}{lib_s:>9.2f}{n:>8}{frame_mib:>11.2f}")
    print(f"{'libp2p, py-libp2p defaults':<28}{def_mbps:>10.1f}{def_s:>9.2f}{n:>8}{frame_mib:>11.2f}")
    print(f"{'raw TCP, same frame work':<28}{tcp_mbps:>10.1f}{tcp_s:>9.2f}{n:>8}{frame_mib:>11.2f}")
    print(f"{'raw TCP, bytes only':<28}{bare_mbps:>10.1f}{bare_s:>9.2f}{n:>8}{frame_mib:>11.2f}")
    print(f"ratio {lib_mbps / tcp_mbps:.3f}   libp2p CPU {cpu_per_gib:.2f} s/GiB (both ends, one process)")
    print(json.dumps({"libp2p_MBps": round(lib_mbps, 1), "tcp_MBps": round(tcp_mbps, 1),
                      "ratio": round(lib_mbps / tcp_mbps, 3), "cpu_s_per_GiB": round(cpu_per_gib, 2),
                      "tcp_bytes_only_MBps": round(bare_mbps, 1), "libp2p_untuned_MBps": round(def_mbps, 1), "ratio_vs_bytes_only": round(lib_mbps / bare_mbps, 3),
                      "frame_bytes": nbytes // n, "frames": n, "yamux_frame_bytes": a.yamux_frame,
                      "credits": a.credits, "repeats": reps}))


if __name__ == "__main__":
    main()
