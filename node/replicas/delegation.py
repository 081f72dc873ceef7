"""Delegated head work: the leading head replica hands whole microbatches to the other head replicas.

Without it one head replica, the leader, computes stage 0 of every microbatch and sends every stage-1
activation, while the other head replicas stand by (`node.replicas.heads`). With `replicas.head_delegation`
and `replica_exchange = "step"` the leader stays the step's only authority but the standbys work:

* The leader opens one `/pmn/delegate/1.0.0` stream to each head replica of its generation (`open_link`; the
  stage-peer policy admits only peers announcing stage 0). A head replica takes the link only from the
  leader it sees announced, and only while it does not lead itself (`DelegationService`, `accept`); such a
  refusal is its own view (an announcement still on its way, delegation off there), so it is not counted against
  the dialler, who dials that peer again after a growing backoff.
* The leader sends a TASK (step, microbatch, attempt) where a delegate has room (`replicas.max_inflight`
  tasks at once, routed like microbatches to the next stage: `Router`), and computes a microbatch itself
  only when none has. Attempts come from the leader's term, as for its own microbatches.
* The delegate reads the microbatch's window from the data itself (data sampling is a pure function of the
  seed, the step and the microbatch), runs stage 0, routes the activation to stage 1 like any head, keeps the
  dense gradient when it comes back and sends DONE. The leader commits the microbatch with that attempt;
  a delegate lost or slower than `replicas.replica_timeout_s` has the microbatch re-generated with a new
  attempt (its late DONE is dropped).
* The leader sends each step's COMMIT over the links. A delegate sums the committed pairs it computed into
  its step bundle (`ReplicaEngine._bundle`; an attempt is committed once, so no verdict is needed at the head),
  pushes it to every head replica and sends the commit downstream with its own `yours`, as the leader does.
  Because a bundle only ever holds committed pairs, a standby's `heads.held_commits` stays the leader's commit;
  and since the delegates' bundles come after the COMMIT, the leader's own bundle push claims the whole commit
  (`ContributionStore.claims`), which a standby takes from the leader it sees announced.

Messages are length-prefixed JSON objects (`node.net.msgio`): the dialler's `hello` (answered `ok` or with an
`error`), then `task` and `commit` from the leader and `done` from the delegate. Anything malformed, out of
range, or a `done` for a task the link never carried fails the link with a `DelegationError` naming it and is
counted against the sender; nothing a delegate or the leader holds changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from node.errors import DelegationError, NodeError, NotAuthorizedError, PeerRefusedError
from node.net import msgio
from node.net.access import DELEGATE, AccessPolicy
from node.net.gate import ProtocolGate, reset_quietly
from node.net.host import parse_peer_addr
from node.net.jsonbound import loads_bounded
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.replicas.averaging import commit_pairs
from node.replicas.heads import MAX_ATTEMPT

DELEGATE_PROTOCOL = TProtocol(DELEGATE)
MAX_STEP = 1 << 40  # the largest step a message may name (as `/pmn/avg`)


@dataclass
class DelegateLimits:
    """Bounds of `/pmn/delegate/1.0.0` (every refusal counts against the sender)."""

    max_message_bytes: int = 1 << 16  # longest message, checked on its length prefix (a COMMIT lists every
    # microbatch of the step)
    max_depth: int = 3  # deepest JSON nesting of a message (a commit's pairs: a list of [mb, attempt] lists)
    idle_timeout_s: float = 10.0  # longest wait for the rest of a message once its length prefix arrived
    hello_timeout_s: float = 10.0  # longest wait for the hello and its answer when a link opens
    max_queued: int = 256  # tasks (delegate side) or dones (leader side) received and not yet taken by the engine
    guard: PeerGuardConfig = field(default_factory=lambda: PeerGuardConfig(max_streams_per_peer=2))  # scores, bans
    # and stream caps (one link per leader; a second while the first is being replaced)

    def message_limits(self) -> msgio.MessageLimits:
        return msgio.MessageLimits(max_header_bytes=self.max_message_bytes, max_body_bytes=0,
                                   max_depth=self.max_depth, idle_timeout_s=self.idle_timeout_s).validate()


@dataclass(frozen=True)
class Task:
    """One microbatch attempt handed over (TASK) or finished (DONE)."""

    step: int  # global step
    mb: int  # microbatch index
    attempt: int  # the leader's attempt id


def _int(msg: dict[str, Any], key: str, hi: int) -> int:
    return msgio.int_field(msg, key, 0, hi, DelegationError)


def parse_task(msg: dict[str, Any], num_microbatches: int) -> Task:
    """A TASK or DONE message's (step, mb, attempt); DelegationError naming the bad field."""
    return Task(_int(msg, "step", MAX_STEP), _int(msg, "mb", num_microbatches - 1), _int(msg, "attempt", MAX_ATTEMPT))


def parse_commit(msg: dict[str, Any], num_microbatches: int) -> tuple[int, dict[int, int]]:
    """A COMMIT message's step and commit (every microbatch exactly once); DelegationError naming what is wrong."""
    step = _int(msg, "step", MAX_STEP)
    pairs = msg.get("commit")
    if not isinstance(pairs, list) or len(pairs) != num_microbatches:
        raise DelegationError(f"a commit lists every one of the step's {num_microbatches} microbatches once")
    return step, commit_pairs(pairs, num_microbatches - 1, MAX_ATTEMPT, DelegationError)


class DelegateLink:
    """One end of a delegation stream: `leading` (we sent the hello: we send tasks and commits, read dones) or
    not (we read tasks and commits, send dones). Looks like an `ActChannel` where the engine reads it (`peer`,
    `failure`, `listeners`, `commits`, `send_commit`, `close`)."""

    def __init__(self, stream: Any, peer: str, leading: bool, num_microbatches: int, limits: DelegateLimits,
                 refuse: Callable[[str, str], object] | None = None) -> None:
        self.stream = stream
        self.peer = peer  # the other end's peer id
        self.leading = leading  # True on the leader's end
        self.m = num_microbatches
        self.limits = limits
        self.refuse: Callable[[str, str], object] = refuse or (lambda peer, reason: None)  # counts a protocol violation against the peer
        self.failure: NodeError | None = None  # why the link ended (None while it runs)
        self.listeners: list[Callable[[], None]] = []  # called when a message arrives or the link ends
        self.commits: list[dict[str, Any]] = []  # COMMITs received (delegate end), as `ActChannel.commits`
        self.inbox: deque[Task] = deque()  # tasks (delegate end) or dones (leader end) not taken yet
        self.sent: set[Task] = set()  # leader end: tasks sent whose DONE has not come
        self.done_upto = -1  # leader end: DONEs of steps up to this one are dropped quietly (the step is applied)
        self.term = -1  # delegate end: the leader's announced term when the link was taken (its tasks' attempts)
        self._lock = trio.Lock()

    def _notify(self) -> None:
        for fn in self.listeners:
            fn()

    async def _send(self, msg: dict[str, Any]) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            async with self._lock:
                await msgio.write_json(self.stream, msg)
        except Exception as exc:  # libp2p raises several stream error types
            self._fail(DelegationError(f"delegation link to peer {self.peer} lost while writing: {exc!r}"))
            raise self.failure from exc  # type: ignore[misc]

    async def send_task(self, step: int, mb: int, attempt: int) -> None:
        """Leader end: hand over (step, mb, attempt)."""
        self.sent.add(Task(step, mb, attempt))
        await self._send({"op": "task", "step": step, "mb": mb, "attempt": attempt})

    async def send_done(self, step: int, mb: int, attempt: int) -> None:
        """Delegate end: (step, mb, attempt) was computed and its gradient is kept."""
        await self._send({"op": "done", "step": step, "mb": mb, "attempt": attempt})

    async def send_commit(self, step: int, commit: dict[int, int], yours: list[int] | None = None) -> None:
        """Leader end: the step's commit (`yours` is not sent: at the head an attempt is committed once)."""
        await self._send({"op": "commit", "step": step, "commit": sorted([mb, a] for mb, a in commit.items())})

    def take(self) -> list[Task]:
        """The tasks (or dones) received since the last call."""
        out = list(self.inbox)
        self.inbox.clear()
        return out

    def forget(self, step: int) -> None:
        """Leader end: `step` is applied; late DONEs of it and earlier steps are dropped quietly."""
        self.done_upto = max(self.done_upto, step)
        self.sent = {t for t in self.sent if t.step > step}

    def _fail(self, err: NodeError) -> None:
        if self.failure is None:
            self.failure = err
            self._notify()

    async def run_reader(self) -> None:
        """Read messages until the stream ends; a malformed one fails the link, counted against the peer."""
        limits = self.limits.message_limits()
        try:
            while True:
                n = await msgio.read_length(self.stream, limits.max_header_bytes, DelegationError, None, "message")
                raw = await msgio.read_exact(self.stream, n, DelegationError, limits.idle_timeout_s)
                self._accept(loads_bounded(raw, limits.max_header_bytes, limits.max_depth, DelegationError))
                self._notify()
        except DelegationError as exc:
            if msgio.is_clean_end(exc):
                self._fail(DelegationError(f"peer {self.peer} closed the delegation link"))
            else:
                self.refuse(self.peer, "delegation_malformed")
                self._fail(DelegationError(f"delegation link from peer {self.peer}: {exc}"))
                await self._tell(str(exc))
        except Exception as exc:  # stream reset / connection closed surfaces as several libp2p types
            self._fail(DelegationError(f"delegation link to peer {self.peer} lost: {exc!r}"))
        finally:
            self._fail(DelegationError(f"delegation link to peer {self.peer} ended"))
            await reset_quietly(self.stream)

    async def _tell(self, why: str) -> None:
        """Best effort: tell the peer why the link ends."""
        await _say(self.stream, why, self.limits.idle_timeout_s)

    def _accept(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            raise DelegationError(f"a message must be an object, got {type(msg).__name__}")
        op = msg.get("op")
        if "error" in msg:
            raise DelegationError(f"peer reported: {str(msg['error'])[:200]}")
        want = ("done",) if self.leading else ("task", "commit")
        if op not in want:
            raise DelegationError(f"unexpected op {str(op)[:32]!r}: this end takes {', '.join(want)}")
        if len(self.inbox) + len(self.commits) >= self.limits.max_queued:
            raise DelegationError(f"more than {self.limits.max_queued} messages are waiting on this link")
        if op == "commit":
            step, commit = parse_commit(msg, self.m)
            self.commits.append({"step": step, "commit": commit, "yours": None})
            return
        task = parse_task(msg, self.m)
        if op == "done":
            if task.step <= self.done_upto:
                return  # a late DONE of an applied step (the microbatch was generated again meanwhile)
            if task not in self.sent:
                raise DelegationError(f"done for step {task.step} microbatch {task.mb} attempt {task.attempt}, a "
                                      "task this link never carried")
            self.sent.discard(task)
        self.inbox.append(task)

    async def close(self) -> None:
        self._fail(DelegationError(f"delegation link to peer {self.peer} closed"))
        await reset_quietly(self.stream)


async def open_link(host: Any, addr: str, spec_hash: str, num_microbatches: int, limits: DelegateLimits,
                    dial_timeout_s: float, refuse: Callable[[str, str], object] | None = None) -> DelegateLink:
    """Leader end: dial a head replica and say hello; DelegationError with its refusal, or on a timeout."""
    info = parse_peer_addr(addr)
    peer = info.peer_id.pretty()
    try:
        with trio.fail_after(dial_timeout_s + limits.hello_timeout_s):
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [DELEGATE_PROTOCOL])
            try:
                await msgio.write_json(stream, {"op": "hello", "spec_hash": spec_hash})
                answer = await msgio.read_json(stream, limits.message_limits(), DelegationError, "hello answer")
            except BaseException:
                await reset_quietly(stream)
                raise
    except trio.TooSlowError:
        raise DelegationError(f"delegation link to peer {peer}: no answer within "
                              f"{dial_timeout_s + limits.hello_timeout_s:g} s") from None
    except DelegationError:
        raise
    except Exception as exc:  # dial and stream failures come as many libp2p / OS types
        raise DelegationError(f"delegation link to peer {peer} failed before its answer: {exc!r}") from exc
    if not isinstance(answer, dict) or answer.get("op") != "ok":
        await reset_quietly(stream)
        why = answer.get("error") if isinstance(answer, dict) else answer
        raise DelegationError(f"peer {peer} refused the delegation link: {str(why)[:200]}")
    return DelegateLink(stream, peer, True, num_microbatches, limits, refuse)


class DelegationService:
    """Serves `/pmn/delegate/1.0.0`: a head replica's end of its leader's link. `accept(link)` (the engine of
    the stage served now) answers "" to take the link, else why not; the link is then read until it ends."""

    def __init__(self, host: Any, spec_hash: str, accept: Callable[[DelegateLink], str],
                 num_microbatches: Callable[[], int], policy: AccessPolicy | None = None,
                 limits: DelegateLimits | None = None, scores: PeerScores | None = None) -> None:
        self.spec_hash = spec_hash  # hex model spec hash; a hello for another model is refused
        self.accept = accept
        self.num_microbatches = num_microbatches  # microbatches per step of the stage served now
        self.limits = limits or DelegateLimits()
        self.gate = ProtocolGate(DELEGATE, policy, self.limits.guard, scores)  # policy, bans, stream caps
        host.set_stream_handler(DELEGATE_PROTOCOL, self._handle)

    async def _handle(self, stream: Any) -> None:
        try:
            async with self.gate.serve(stream) as peer:
                try:
                    with trio.fail_after(self.limits.hello_timeout_s):
                        await self.gate.authorize(peer, 0)  # before a byte is read: only head replicas may dial
                        hello = await msgio.read_json(stream, self.limits.message_limits(), DelegationError, "hello")
                        if not isinstance(hello, dict) or hello.get("op") != "hello":
                            raise DelegationError("a delegation link starts with a hello")
                        if hello.get("spec_hash") != self.spec_hash:
                            raise DelegationError("this node trains another model")
                        link = DelegateLink(stream, peer.pretty(), False, self.num_microbatches(), self.limits,
                                            self.gate.refuse)
                        why = self.accept(link)
                        if why:  # our own view (not leading by our table, delegation off): not counted
                            await self._refuse(stream, why)
                            return
                        await msgio.write_json(stream, {"op": "ok"})
                except (DelegationError, trio.TooSlowError) as exc:
                    self.gate.refuse(peer, type(exc).__name__)
                    await self._refuse(stream, str(exc) or "no hello in time")
                    return
                except NotAuthorizedError:
                    await self._refuse(stream, "not authorized")
                    return
                await link.run_reader()
        except PeerRefusedError:
            return
        except Exception:  # a misbehaving or vanished peer only loses its own link
            await reset_quietly(stream)

    async def _refuse(self, stream: Any, why: str) -> None:
        """Tell the dialler why, then close the stream (a reset could overtake the message)."""
        if await _say(stream, why, self.limits.idle_timeout_s, close=True):
            return
        await reset_quietly(stream)


async def _say(stream: Any, why: str, timeout_s: float, close: bool = False) -> bool:
    """Best effort: send `{"error": why}` (and close the stream when `close`); True once done within `timeout_s`."""
    try:
        with trio.move_on_after(timeout_s):
            await msgio.write_json(stream, {"error": why[:200]})
            if close:
                await stream.close()
            return True
    except Exception:  # the peer is gone: nothing to tell
        pass
    return False
