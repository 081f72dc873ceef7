"""Free loopback ports chosen by the OS, never derived from the clock."""

from __future__ import annotations

import contextlib
import socket

ATTEMPTS = 50  # OS-chosen first ports tried before giving up on a run of free ports


def free_port_run(count: int) -> int:
    """A port p such that p, p+1, ..., p+count-1 are all free on 127.0.0.1 now; p is chosen by the OS."""
    for _ in range(ATTEMPTS):
        with contextlib.ExitStack() as held:  # keep each port bound until the whole run is checked
            first = held.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            base = int(first.getsockname()[1])
            try:
                for i in range(1, count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", base + i))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no run of {count} free loopback ports found in {ATTEMPTS} attempts")
