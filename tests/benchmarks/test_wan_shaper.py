"""`benchmarks/wan_shaper.py`'s relay over real loopback TCP: data crosses with the link's delay, a half-close
keeps the other direction open, and a connection reset by one side ends the relay instead of leaving it waiting
on a peer that never closes (what left pending tasks behind in the benchmark's shaper)."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import struct
import sys
import time
from types import ModuleType

import pytest

from tests.benchmarks.scripts import ROOT

pytestmark = pytest.mark.timeout(60)
DELAY_S = 0.05  # one-way delay of the relayed link
RATE_BPS = 1e8  # its rate


def _shaper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_wan_shaper", ROOT / "benchmarks" / "wan_shaper.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def _relayed(shaper: ModuleType, silent: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                               list[asyncio.Task[None]], asyncio.Server, asyncio.Server]:
    """A client connection through the relay to a destination that echoes (or, `silent`, only reads)."""
    async def destination(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1024):
                if not silent:
                    w.write(data)
                    await w.drain()
            if silent:
                await asyncio.sleep(3600)  # never closes its side
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    dest = await asyncio.start_server(destination, "127.0.0.1", 0)
    port = dest.sockets[0].getsockname()[1]
    relays: list[asyncio.Task[None]] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        task = asyncio.current_task()
        assert task is not None
        relays.append(task)
        await shaper.relay(r, w, r2, w2, DELAY_S, RATE_BPS)

    front = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
    return reader, writer, relays, front, dest


async def _close(*servers: asyncio.Server) -> None:
    for s in servers:
        s.close()
        await s.wait_closed()


def test_data_crosses_with_the_links_delay_both_ways() -> None:
    shaper = _shaper()

    async def main() -> None:
        reader, writer, relays, front, dest = await _relayed(shaper, silent=False)
        t0 = time.monotonic()
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert time.monotonic() - t0 >= 2 * DELAY_S  # there and back, each direction delayed
        writer.write_eof()  # a half-close: the echo side then ends, and with it the relay
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.wait_for(asyncio.gather(*relays), 5)
        writer.close()
        await writer.wait_closed()
        await _close(front, dest)

    asyncio.run(main())


def test_a_reset_connection_ends_the_relay_though_the_other_side_never_closes() -> None:
    shaper = _shaper()

    async def main() -> None:
        reader, writer, relays, front, dest = await _relayed(shaper, silent=True)
        writer.write(b"x" * 1000)
        await writer.drain()
        while not relays:
            await asyncio.sleep(0.01)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(*relays), 5)  # the relay ended, both sides closed
        assert all(t.done() for t in relays)
        await _close(front, dest)

    asyncio.run(main())
