"""Run a py-libp2p host and close every connection it holds when the block exits.

py-libp2p 0.8.1's `BasicHost.run()` stops the swarm by cancelling it; the swarm's own clean-up of its
connections then runs inside that cancellation, so its first `await` is cancelled and every dialed
socket is left open (a ResourceWarning each when collected). `run_host` closes the swarm through its
public `close()` first, shielded, and bounded by `close_timeout_s`. Upstream fix: shield the
connection clean-up in `Swarm.run`'s `finally` (or have `BasicHost.run` await `Swarm.close()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import multiaddr
import trio
from libp2p.abc import IHost

CLOSE_TIMEOUT_S = 5.0  # longest wait for the host's connections and listeners to close on exit


@contextlib.asynccontextmanager
async def run_host(host: IHost, listen_addrs: Sequence[multiaddr.Multiaddr],
                   close_timeout_s: float = CLOSE_TIMEOUT_S) -> AsyncIterator[IHost]:
    """`host.run(listen_addrs)`, and on exit (also by error or cancellation) close its swarm first."""
    async with host.run(listen_addrs=listen_addrs):
        try:
            yield host
        finally:
            with trio.move_on_after(close_timeout_s) as scope:
                scope.shield = True
                await host.get_network().close()
