"""The NAT fixture itself: a home reaches the public segment through its router, the public side cannot dial
the home, peers see the router's address, and nothing is left after teardown (also after a failure)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from node.testing.netns import PUBLIC_IP, NetnsError, available, leftover, nat_topology
from tests.waiting import wait_until

pytestmark = [pytest.mark.network, pytest.mark.skipif(available() is not None, reason=str(available()))]

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()
print("listening", flush=True)
c, addr = s.accept(); print(addr[0], flush=True); c.close(); s.close()
"""


def _server(topo, ns: str, ip: str, port: int) -> subprocess.Popen[bytes]:
    proc = topo.popen(ns, [sys.executable, "-c", SERVER, ip, str(port)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"listening"
    return proc


@pytest.mark.timeout(60)
def test_home_dials_out_public_cannot_dial_in() -> None:
    with nat_topology(homes=2) as topo:
        h1, h2 = topo.homes
        # the home reaches a public listener; the listener sees the router's wan address, not the home's
        srv = _server(topo, topo.public_ns, PUBLIC_IP, 4001)
        assert topo.can_connect(h1.home_ns, PUBLIC_IP, 4001)
        assert srv.stdout is not None and srv.stdout.readline().decode().strip() == h1.wan_ip
        srv.wait(timeout=10)
        # a listener in the home is not reachable from the public side (no route, no inbound mapping),
        # not through the router's wan address either, and not from the other home
        _server(topo, h1.home_ns, h1.lan_ip, 4002)
        assert not topo.can_connect(topo.public_ns, h1.lan_ip, 4002, timeout_s=1.0)
        assert not topo.can_connect(topo.public_ns, h1.wan_ip, 4002, timeout_s=1.0)
        assert not topo.can_connect(h2.home_ns, h1.wan_ip, 4002, timeout_s=1.0)
        assert not topo.can_connect(h2.home_ns, h1.lan_ip, 4002, timeout_s=1.0)
        # the home itself can (the listener is real)
        assert topo.can_connect(h1.home_ns, h1.lan_ip, 4002)
        assert h1.mappings() >= 1  # the router tracked the home's outgoing connection
        h1.drop_mappings()
        wait_until(lambda: h1.mappings() == 0, 10, "the router to forget its NAT mappings",
                   detail=h1.mappings)
        tag = topo.tag
        assert len(leftover(tag)) == 5
    assert leftover(tag) == []


@pytest.mark.timeout(60)
def test_teardown_after_a_failure_leaves_nothing() -> None:
    tag = ""
    with pytest.raises(ZeroDivisionError):
        with nat_topology(homes=1) as topo:
            tag = topo.tag
            proc = topo.popen(topo.public_ns, [sys.executable, "-c", "import signal; signal.pause()"])
            _ = 1 / 0
    assert tag and leftover(tag) == []
    assert proc.poll() is not None


def test_unknown_namespace_refused() -> None:
    with nat_topology(homes=1) as topo:
        with pytest.raises(NetnsError):
            topo.prefix("not-ours")
