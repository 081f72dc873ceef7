"""A transparent TCP shaper: every TCP connection made inside a network namespace gets a WAN link.

`benchmarks/wan.py` runs the nodes in one network namespace whose nftables `output` NAT chain redirects
every locally made TCP connection (except the shaper's own, marked with SO_MARK) to this process. It
reads the original destination (SO_ORIGINAL_DST), connects there and relays both directions. Each
direction of each connection is a link: bytes are serialised at `rate_mbit` (one queue per direction)
and delivered `delay_ms` after they finished serialising. The node processes and their libp2p stacks
are unmodified; only the kernel's redirect and this relay sit between them.

Run: `python benchmarks/wan_shaper.py PORT DELAY_MS RATE_MBIT` (prints "ready" once listening).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MARK = 1  # SO_MARK of the shaper's outgoing sockets (the redirect rule skips them)
CHUNK = 64 * 1024  # bytes read at a time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, rate_bps: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(deliver())
    free_at = 0.0  # when this direction's serialiser is free
    try:
        while True:
            data = await reader.read(CHUNK)
            now = time.monotonic()
            free_at = max(now, free_at) + len(data) * 8 / rate_bps
            queue.put_nowait((free_at + delay_s, data))
            if not data:
                break
        await task
    finally:
        if not task.done():  # this direction failed or was cancelled: its delivery goes too
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                  rate_bps: float) -> None:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, ip = struct.unpack("!2xH4s8x", raw)
        out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out.setblocking(False)
        await asyncio.get_running_loop().sock_connect(out, (socket.inet_ntoa(ip), port))
        r2, w2 = await asyncio.open_connection(sock=out)
    except OSError:
        writer.close()
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await relay(reader, writer, r2, w2, delay_s, rate_bps)


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, r2: asyncio.StreamReader,
                w2: asyncio.StreamWriter, delay_s: float, rate_bps: float) -> None:
    """Relay one connection both ways (each direction a link) until both directions ended or one failed; closes
    both sides. An orderly end (EOF) of one direction leaves the other running (a half-close); a failed direction
    (a reset connection) ends the other too, rather than leaving it waiting on a socket nobody closes."""
    pipes = [asyncio.create_task(_pipe(reader, w2, delay_s, rate_bps)),
             asyncio.create_task(_pipe(r2, writer, delay_s, rate_bps))]
    try:
        pending: set[asyncio.Task[None]] = set(pipes)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() is not None for t in done):
                break
    finally:
        for t in pipes:
            t.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        for w in (writer, w2):
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in (writer, w2)), return_exceptions=True)


async def serve(port: int, delay_ms: float, rate_mbit: float) -> None:
    """Relay every redirected connection until killed."""
    delay_s, rate_bps = delay_ms / 1e3, rate_mbit * 1e6
    server = await asyncio.start_server(lambda r, w: _handle(r, w, delay_s, rate_bps), "0.0.0.0", port,
                                        backlog=256)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])))
