"""Real NAT for tests and benchmarks: network namespaces, veth links, a bridge and nftables masquerade (Linux, root).

    public segment (namespace `<tag>-pub`, bridge br0, 198.18.0.1/24: public nodes listen here)
        |-- r1 (veth) == wan of router `<tag>-r1` (198.18.0.11) -- masquerade -- lan 10.1.0.1/24 == home `<tag>-h1` (10.1.0.2)
        |-- r2 (veth) == wan of router `<tag>-r2` (198.18.0.12) -- masquerade -- lan 10.2.0.1/24 == home `<tag>-h2` (10.2.0.2)

Each router forwards what its home sends out (source-NATed to its wan address) and the replies of those
connections (conntrack), and silently drops every new connection from the wan side, to its home or to
itself: a home router with no inbound port that, as RFC 5382 (REQ-4) asks, does not answer an
unsolicited SYN with a reset (which would also defeat TCP hole punching, whose SYNs cross). Addresses exist only inside namespaces created here (198.18.0.0/15 is the benchmarking
range, 10/8 private); every link is created inside a namespace, so deleting the namespaces removes them.
`nat_topology()` is a context manager that removes every namespace and process it started, also when the
body fails, and checks that none is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from node.errors import NodeError

PUBLIC_IP = "198.18.0.1"  # the public segment's address (public nodes listen on it)
PUBLIC_NET = "198.18.0.0/24"
CMD_TIMEOUT_S = 10.0  # longest run of one ip / nft command


class NetnsError(NodeError):
    """A namespace could not be built or torn down."""


def available() -> str | None:
    """None when namespaces with nftables NAT can be built here, else the reason why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command (Debian packages iproute2 / nftables)"
    return None


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command (inside namespace `ns` when given); NetnsError with its stderr on failure."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def router_rules(wan: str, lan: str, symmetric: bool = False) -> str:
    """The nftables ruleset of a home router: masquerade out of `wan`, no inbound connections. `symmetric`
    randomises the source port of every outbound connection (a symmetric NAT, as carrier-grade NATs are):
    a peer cannot predict the mapping, so TCP hole punching cannot work through it."""
    masquerade = "masquerade random" if symmetric else "masquerade"
    return f"""
table ip pmnnat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{wan}" {masquerade}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{wan}" ct state new drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{lan}" oifname "{wan}" accept
  }}
}}
"""


@dataclass
class Home:
    """One home: a router namespace (wan on the public segment, NAT) and a home namespace behind it."""

    index: int  # 1, 2, ...
    router_ns: str  # the router's namespace
    home_ns: str  # the home's namespace (nodes behind the NAT run here)
    wan_ip: str  # the router's public address (what peers observe)
    lan_ip: str  # the home node's private address

    def drop_mappings(self) -> None:
        """The router forgets every NAT mapping (as a reconnecting router does): its wan link goes down and up,
        and masquerade deletes the conntrack entries of that interface."""
        sh("ip", "link", "set", "wan", "down", ns=self.router_ns)
        sh("ip", "link", "set", "wan", "up", ns=self.router_ns)

    def renumber(self) -> str:
        """The provider gives the router a new wan address (the old one is removed): masquerade drops every
        mapping made with the old address, so each connection of the home breaks. Returns the new address."""
        new = f"198.18.0.{int(self.wan_ip.rsplit('.', 1)[1]) + 100}"
        # the old address goes first: deleting a primary address also deletes the secondaries of its subnet
        sh("ip", "addr", "del", f"{self.wan_ip}/24", "dev", "wan", ns=self.router_ns)
        sh("ip", "addr", "add", f"{new}/24", "dev", "wan", ns=self.router_ns)
        self.wan_ip = new
        return new

    def mappings(self) -> int:
        """How many conntrack entries the router holds (from /proc, no conntrack tool needed)."""
        res = sh("cat", "/proc/net/nf_conntrack", ns=self.router_ns, check=False)
        return len([ln for ln in res.stdout.splitlines() if ln.strip()]) if res.returncode == 0 else -1


@dataclass
class Topology:
    """The namespaces of one test, and the processes started inside them."""

    tag: str  # unique prefix of every namespace of this run
    public_ns: str  # the public segment (bridge) namespace; public nodes run here
    homes: list[Home] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # started by `popen`, stopped at teardown

    @property
    def namespaces(self) -> list[str]:
        return [self.public_ns] + [n for h in self.homes for n in (h.router_ns, h.home_ns)]

    def prefix(self, ns: str) -> list[str]:
        """The command prefix running a program inside namespace `ns`."""
        if ns not in self.namespaces:
            raise NetnsError(f"namespace {ns} is not part of this topology")
        return ["ip", "netns", "exec", ns]

    def popen(self, ns: str, cmd: list[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start `cmd` inside `ns`; the process is stopped at teardown if still running."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.prefix(ns) + cmd, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def can_connect(self, ns: str, ip: str, port: int, timeout_s: float = 2.0) -> bool:
        """Whether a TCP connect from `ns` to ip:port succeeds within `timeout_s` (python inside the namespace)."""
        code = (f"import socket,sys\ns=socket.socket();s.settimeout({timeout_s})\n"
                f"try:\n s.connect(({ip!r},{port}));print('ok')\nexcept OSError as e:\n print(type(e).__name__)\n"
                "finally:\n s.close()")
        res = subprocess.run(self.prefix(ns) + [sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout_s + CMD_TIMEOUT_S)
        return res.stdout.strip() == "ok"


def _build(topo: Topology, homes: int, symmetric: bool) -> None:
    pub = topo.public_ns
    sh("ip", "netns", "add", pub)
    sh("ip", "-n", pub, "link", "set", "lo", "up")
    sh("ip", "-n", pub, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", pub, "addr", "add", f"{PUBLIC_IP}/24", "dev", "br0")
    sh("ip", "-n", pub, "link", "set", "br0", "up")
    for i in range(1, homes + 1):
        home = Home(i, f"{topo.tag}-r{i}", f"{topo.tag}-h{i}", f"198.18.0.{10 + i}", f"10.{i}.0.2")
        topo.homes.append(home)
        r, h = home.router_ns, home.home_ns
        sh("ip", "netns", "add", r)
        sh("ip", "netns", "add", h)
        for ns in (r, h):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # router wan <-> port r<i> on the public bridge
        sh("ip", "-n", r, "link", "add", "wan", "type", "veth", "peer", "name", f"r{i}", "netns", pub)
        sh("ip", "-n", pub, "link", "set", f"r{i}", "master", "br0")
        sh("ip", "-n", pub, "link", "set", f"r{i}", "up")
        sh("ip", "-n", r, "addr", "add", f"{home.wan_ip}/24", "dev", "wan")
        sh("ip", "-n", r, "link", "set", "wan", "up")
        # router lan <-> eth0 of the home
        sh("ip", "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", h)
        sh("ip", "-n", r, "addr", "add", f"10.{i}.0.1/24", "dev", "lan")
        sh("ip", "-n", r, "link", "set", "lan", "up")
        sh("ip", "-n", r, "route", "add", "unreachable", "10.0.0.0/8")  # other homes: fail fast, no route
        sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", ns=r)
        res = subprocess.run(["ip", "netns", "exec", r, "nft", "-f", "-"], input=router_rules("wan", "lan", symmetric),
                             capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if res.returncode != 0:
            raise NetnsError(f"nft in {r} failed: {res.stderr.strip()}")
        sh("ip", "-n", h, "addr", "add", f"{home.lan_ip}/24", "dev", "eth0")
        sh("ip", "-n", h, "link", "set", "eth0", "up")
        sh("ip", "-n", h, "route", "add", "default", "via", f"10.{i}.0.1")


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for pipe in (p.stdout, p.stderr, p.stdin):
            if pipe is not None:
                pipe.close()


def leftover(tag: str) -> list[str]:
    """Namespaces whose name starts with `tag` (none after a clean teardown)."""
    out = sh("ip", "netns", "list").stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip() and ln.split()[0].startswith(tag)]


def teardown(topo: Topology) -> None:
    """Stop the processes, delete every namespace (their links go with them); NetnsError if any is left."""
    _stop(topo.procs)
    for ns in reversed(topo.namespaces):
        sh("ip", "netns", "del", ns, check=False)
    left = leftover(topo.tag)
    if left:
        raise NetnsError(f"namespaces left after teardown: {left}")


@contextlib.contextmanager
def nat_topology(homes: int = 1, symmetric: bool = False) -> Iterator[Topology]:
    """A public segment and `homes` homes behind their own NAT routers (symmetric NATs when `symmetric`, see
    `router_rules`); torn down on exit, whatever happened."""
    reason = available()
    if reason is not None:
        raise NetnsError(reason)
    tag = f"pmn{uuid.uuid4().hex[:8]}"
    topo = Topology(tag=tag, public_ns=f"{tag}-pub")
    try:
        _build(topo, homes, symmetric)
        yield topo
    finally:
        teardown(topo)
