"""`/pmn/act/1.0.0`: framed, credit-controlled, acknowledged channel between pipeline neighbours.

One libp2p stream carries both directions between stage k (opener) and stage k+1 (acceptor):
activations flow k -> k+1, gradients k+1 -> k. Each side grants the other `credits` frames at the
handshake and one more each time the application consumes a frame, so a reader never stops
reading (yamux resets a stream whose reader pauses > 5 s). Every accepted data frame is acked;
the ack carries the acked digest and an optional countersignature from the `ReceiptHook`.

HELLO names the sender's Ethereum address and carries its binding (`node.net.identity.bind`: the node
key's signature over the peer id); the receiver checks it against the peer id Noise authenticated
and refuses the handshake when it does not verify, so receipts name the node key that really sent.

Per received data frame the digest check and the decoder (torch work) run in one worker-thread
hop; without a decoder the BLAKE3 digest is checked on the loop unless the body reaches
`hash_thread_bytes` (a hop costs the loop more than hashing a MiB does). A CREDIT
for a consumed frame travels in the same write as the next ACK or data frame unless the peer is
out of credit (then it goes at once). The wire format is unchanged: a peer sees the same frames.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from node.config import TransportConfig
from node.errors import (
    BindingError,
    ChecksumError,
    FrameError,
    FrameTooLargeError,
    HandshakeError,
    NodeError,
    NonFiniteError,
    NotAuthorizedError,
    PeerBannedError,
    PeerLostError,
    RemoteError,
    TruncatedFrameError,
    UnexpectedFrameError,
)
from node.net.access import ACT, AccessPolicy
from node.net.chunks import take_chunks
from node.net.identity import NodeIdentity, bind, verify_binding
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.net.transport.io import grow_receive_window, read_some, write_gather
from node.net.transport.locks import QuickLock
from node.wire import frames

ACT_PROTOCOL = TProtocol("/pmn/act/1.0.0")
DATA_KINDS = (frames.Kind.ACTIVATION, frames.Kind.GRADIENT, frames.Kind.EVAL)  # EVAL: forward only, no receipt
READ_CHUNK = 1 << 22  # most bytes taken from the muxer per read call
MAX_CONTROL_BYTES = 64 * 1024  # limit on HELLO/ACK/CREDIT/ERROR/CLOSE/LOSS/NORM frames (header + body)


async def digest_off_loop(window: bytes, payload: bytes, in_thread: bool) -> bytes:
    """frames.digest; in a worker thread when `in_thread` (TransportConfig.hashes_in_thread of the body size).

    BLAKE3 hashes a MiB in about a quarter of a millisecond, less than a worker-thread hop costs
    the loop, so only very large bodies are worth the hop (TransportConfig.hash_thread_bytes).
    """
    if in_thread:
        return await trio.to_thread.run_sync(frames.digest, window, payload)
    return frames.digest(window, payload)


def fill_window(fr: frames.Frame, source: Callable[[int, int], bytes] | None) -> frames.Frame:
    """The frame with the token window of (step, microbatch) read from this node's dataset (`source`), for an
    ACTIVATION frame that travelled without one (FrameSpec.local_windows); any other frame unchanged."""
    h = fr.header
    if h.kind != frames.Kind.ACTIVATION or h.window_len or source is None:
        return fr
    return frames.Frame(header=h, window=source(h.step, h.microbatch), payload=fr.payload, signature=fr.signature)


def verify_and_decode(fr: frames.Frame, decoder: Callable[[frames.Frame], Any] | None,
                      window_source: Callable[[int, int], bytes] | None = None) -> tuple[frames.Frame, Any]:
    """The window filled in from this node's dataset (`fill_window`), the digest check, then the decoder (None
    without one): the whole per-frame work of one worker-thread hop. Returns the (filled) frame and the value.

    FrameError passes through; any other decoder error becomes NonFiniteError (the payload is unusable).
    """
    fr = fill_window(fr, window_source)
    try:
        frames.verify_digest(fr.header, fr.window, fr.payload)
    except ChecksumError as exc:
        if fr.header.kind == frames.Kind.ACTIVATION and not fr.header.window_len:
            raise ChecksumError(f"{exc}: the frame's digest does not cover the token window this node reads from the "
                                "spec's dataset for that step and microbatch (the sender trains on other data, or "
                                "sent another payload)") from None
        raise
    if decoder is None:
        return fr, None
    try:
        return fr, decoder(fr)
    except FrameError:
        raise
    except Exception as exc:  # a codec error of any type means the payload is unusable
        raise NonFiniteError(f"{fr.header.kind.name.lower()} payload rejected by the codec: {exc}") from exc


async def _notify_all(cv: trio.Condition) -> None:
    """cv.notify_all(), without the scheduler turn of `async with cv` when its lock is free (usually:
    waiters release it while they wait); when a woken waiter holds it, waits for it as before."""
    try:
        cv.acquire_nowait()
    except trio.WouldBlock:
        async with cv:
            cv.notify_all()
        return
    try:
        cv.notify_all()
    finally:
        cv.release()


class ReceiptHook(Protocol):
    """Signs outgoing data frames and countersigns incoming ones (EIP-712 receipts live in `protocol`)."""

    def sign(self, header: frames.FrameHeader, peer_address: str) -> bytes:
        """Sender's signature over the frame (its digest), or b"" when receipts are off."""
        ...

    def countersign(self, header: frames.FrameHeader, signature: bytes, peer_address: str) -> bytes:
        """Verify the sender's signature and return the receiver's countersignature (FrameError if bad)."""
        ...

    def on_ack(self, header: frames.FrameHeader, countersignature: bytes, peer_address: str) -> None:
        """Called on the sender when its frame was acknowledged."""
        ...


class NullReceipts:
    """Receipts off: no signatures."""

    def sign(self, header: frames.FrameHeader, peer_address: str) -> bytes:
        return b""

    def countersign(self, header: frames.FrameHeader, signature: bytes, peer_address: str) -> bytes:
        return b""

    def on_ack(self, header: frames.FrameHeader, countersignature: bytes, peer_address: str) -> None:
        return None


def peer_scores(cfg: TransportConfig) -> PeerScores:
    """A node's refusal scores (`node.net.peerscore`): each rejected frame or refused request costs the peer
    `cfg.reject_penalty`, and at `cfg.ban_score` it is banned, for a time that backs off with each ban. One instance
    serves every protocol of a node (the lifecycle's `NodeContext.scores`), so a ban on one is a ban on all."""
    return PeerScores(PeerGuardConfig(penalty=cfg.reject_penalty, ban_score=cfg.ban_score))


@dataclass(frozen=True)
class LocalInfo:
    """What this node tells its neighbours at the handshake."""

    spec_hash: bytes  # 32-byte model spec hash
    stage: int  # our stage index
    num_stages: int  # pipeline depth
    address: str  # our Ethereum address (node key), for receipts; "" claims none (receipts off only)
    binding: bytes = b""  # node key's signature over our peer id (`node.net.identity.bind`); b"" with address ""
    eval_plan: tuple[int, int] = (0, 0)  # (runtime.eval_every, eval_batches) this node evaluates with; (0, 0) = none

    @classmethod
    def of(cls, identity: NodeIdentity, spec_hash: bytes, stage: int, num_stages: int,
           eval_plan: tuple[int, int] = (0, 0)) -> LocalInfo:
        """Our handshake info with the identity's address and its binding to the identity's peer id."""
        return cls(spec_hash, stage, num_stages, identity.address, bind(identity), eval_plan)


@dataclass(frozen=True)
class Hello:
    """The remote side's handshake."""

    stage: int  # its stage index
    num_stages: int  # its pipeline depth
    credits: int  # frames it lets us have in flight
    address: str  # its Ethereum address ("" = none claimed), checked against `binding` at the handshake
    next_step: int = -1  # first global step it has not applied yet (-1 = not reported)
    binding: bytes = b""  # its node key's signature over its peer id (`node.net.identity.bind`)
    eval_plan: tuple[int, int] = (0, 0)  # its (eval_every, eval_batches); must equal ours


@dataclass
class Received:
    """A data frame accepted from the neighbour, with its decoded value."""

    frame: frames.Frame  # the frame as received
    value: Any  # what the decoder returned (a tensor in the runtime)


@dataclass
class ChannelStats:
    """Byte and frame counters of one channel."""

    bytes_in: int = 0  # bytes read (headers + bodies)
    bytes_out: int = 0  # bytes written
    frames_in: int = 0  # data frames accepted
    frames_out: int = 0  # data frames sent


class _Reader:
    """Exact reads over a libp2p stream that returns arbitrary chunks.

    Chunks are kept as received; a read returns a chunk as is when it matches exactly, else joins
    the pieces it needs once (each received byte is copied at most once here).
    """

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self.chunks: deque[bytes | bytearray] = deque()  # received, not yet returned, oldest first
        self.offset = 0  # bytes of chunks[0] already returned
        self.avail = 0  # bytes held in chunks beyond offset

    async def read_exactly(self, n: int) -> bytes:
        """n bytes, or EOFError(bytes that did arrive) if the stream ends first."""
        await self.fill(n)
        return self.take(n)

    async def read_parts(self, sizes: Sequence[int]) -> list[bytes]:
        """Consecutive pieces of the given sizes, once all of them arrived (EOFError(bytes that did) if not)."""
        await self.fill(sum(sizes))
        return [self.take(n) for n in sizes]

    async def fill(self, n: int) -> None:
        """Wait until n bytes are buffered (EOFError(bytes buffered) if the stream ends first)."""
        while self.avail < n:
            chunk = await self._read(self.avail)
            self.chunks.append(chunk)
            self.avail += len(chunk)

    def take(self, n: int) -> bytes:
        """The next n buffered bytes (n <= avail)."""
        out, self.offset = take_chunks(self.chunks, self.offset, n)
        self.avail -= n
        return out

    async def _read(self, have: int) -> bytes | bytearray:
        try:
            chunk = await read_some(self.stream, READ_CHUNK)
        except EOFError:
            chunk = b""
        if not chunk:
            raise EOFError(have)
        return chunk


class ActChannel:
    """One side of an activation-protocol stream."""

    def __init__(
        self,
        stream: INetStream,
        *,
        local: LocalInfo,
        frame_spec: frames.FrameSpec,
        cfg: TransportConfig,
        scores: PeerScores,
        receipts: ReceiptHook | None = None,
        decoder: Callable[[frames.Frame], Any] | None = None,
        step_fn: Callable[[], int] | None = None,
        window_source: Callable[[int, int], bytes] | None = None,
        totals: ChannelStats | None = None,
    ) -> None:
        self.stream = stream
        # (step, microbatch) -> token window bytes from this node's dataset: fills ACTIVATION frames that travel
        # without their window (FrameSpec.local_windows); None when windows travel on the wire
        self.window_source = window_source
        self.step_fn = step_fn  # returns our next step for the HELLO (None = not reported)
        self.local = local
        self.spec = frame_spec
        self.cfg = cfg
        self.scores = scores
        self.receipts: ReceiptHook = receipts or NullReceipts()
        self.decoder = decoder  # runs off the event loop; raises FrameError on a bad payload
        self.peer = stream.muxed_conn.peer_id.pretty()
        self.remote: Hello | None = None
        self.stats = ChannelStats()
        self.totals = totals  # counters of every channel of an endpoint (ActEndpoint.totals) this one adds to too
        self._reader = _Reader(stream)
        self._write_lock = QuickLock(trio.Lock())  # taken without a scheduler turn when free
        self._inbox_send, self._inbox = trio.open_memory_channel[Received | BaseException](math.inf)
        self._credit_out = 0  # frames we may still send
        self._credit_cv = trio.Condition()
        self._granted_left = cfg.credits  # frames the peer may still send us (credits sent to it)
        self._credit_due = 0  # credits for consumed frames not sent yet (they ride along the next write)
        self._pending: dict[tuple[int, int, bytes], list[frames.FrameHeader]] = {}  # (step, mb, digest) -> unacked
        self._pending_count = 0  # data frames sent and not yet acknowledged
        self._acks_cv = trio.Condition()
        self.failure: NodeError | None = None  # why the channel died (None while healthy)
        self.closed_by_peer = False  # True after an orderly CLOSE from the peer
        self.listeners: list[Callable[[], None]] = []  # called whenever a frame or a failure arrives
        self.commits: list[dict[str, Any]] = []  # COMMIT payloads received from the upstream peer, oldest first
        self.norms: dict[tuple[int, int], float] = {}  # (step, frames.NORM_* phase) -> squared norm received
        self._norms_cv = trio.Condition()

    # -- handshake ---------------------------------------------------------------------------------

    def _hello_bytes(self) -> bytes:
        body = json.dumps({
            "stage": self.local.stage, "num_stages": self.local.num_stages,
            "credits": self.cfg.credits, "address": self.local.address,
            "next_step": self.step_fn() if self.step_fn else -1, "binding": "0x" + self.local.binding.hex(),
            "eval": list(self.local.eval_plan),
        }).encode()
        return frames.encode_frame(frames.Kind.HELLO, self.local.spec_hash, self.local.stage, 0, 0, payload=body)

    async def _read_control(self) -> frames.Frame:
        try:
            raw = await self._reader.read_exactly(frames.HEADER_SIZE)
            h = frames.decode_header(raw, min(self.cfg.max_frame_bytes, MAX_CONTROL_BYTES))
            body = await self._reader.read_exactly(h.body_len) if h.body_len else b""
        except EOFError as exc:
            raise HandshakeError(f"peer {self.peer} closed the stream during the handshake") from exc
        except NodeError:
            raise
        except Exception as exc:  # stream reset / connection errors
            raise HandshakeError(f"peer {self.peer} reset the stream during the handshake: {exc!r}") from exc
        return frames.split_body(h, body)

    async def handshake(self, initiator: bool) -> Hello:
        """Exchange HELLO frames; refuse a different model spec hash naming both hashes."""
        with trio.fail_after(self.cfg.handshake_timeout_s):
            if initiator:
                await self._write(self._hello_bytes())
            fr = await self._read_control()
            if fr.header.kind == frames.Kind.ERROR:
                raise RemoteError(f"peer {self.peer} refused the handshake: {fr.payload.decode(errors='replace')}")
            if fr.header.kind != frames.Kind.HELLO:
                raise HandshakeError(f"peer {self.peer} sent {fr.header.kind.name} before HELLO")
            try:
                frames.check_spec_hash(fr.header, self.local.spec_hash)
                info = json.loads(fr.payload)
                every, batches = info.get("eval", (0, 0))
                hello = Hello(int(info["stage"]), int(info["num_stages"]), int(info["credits"]), str(info["address"]),
                              int(info.get("next_step", -1)), bytes.fromhex(str(info.get("binding", "")).removeprefix("0x")),
                              (int(every), int(batches)))
            except (FrameError, ValueError, KeyError, TypeError) as exc:
                await self.send_error(str(exc))
                raise HandshakeError(f"handshake with peer {self.peer} refused: {exc}") from exc
            if hello.eval_plan != self.local.eval_plan:
                msg = (f"evaluation mismatch: peer evaluates every {hello.eval_plan[0]} steps on {hello.eval_plan[1]} "
                       f"validation microbatches, we every {self.local.eval_plan[0]} on {self.local.eval_plan[1]} "
                       "(runtime.eval_every / eval_batches must match; 0 = off)")
                await self.send_error(msg)
                raise HandshakeError(msg)
            if hello.num_stages != self.local.num_stages or hello.credits < 1:
                msg = (f"pipeline mismatch: peer has num_stages={hello.num_stages} credits={hello.credits}, "
                       f"we have num_stages={self.local.num_stages}")
                await self.send_error(msg)
                raise HandshakeError(msg)
            await self._check_binding(hello)
            if not initiator:
                await self._write(self._hello_bytes())
        self.remote = hello
        self._credit_out = hello.credits
        await grow_receive_window(self.stream, self.cfg.stream_window_bytes)
        return hello

    async def _check_binding(self, hello: Hello) -> None:
        """Refuse a peer whose claimed address is not bound to its peer id (which Noise authenticated).

        A peer that claims no address is accepted only while our receipts are off: no receipt could name it.
        """
        if not hello.address:
            if isinstance(self.receipts, NullReceipts):
                return
            msg = f"peer {self.peer} claims no address, and receipts need the node key of each neighbour"
        else:
            try:
                verify_binding(hello.address, self.stream.muxed_conn.peer_id, hello.binding)
                return
            except BindingError as exc:
                msg = f"peer {self.peer} claims address {hello.address} without a valid binding: {exc}"
        await self.send_error(msg)
        raise HandshakeError(msg)

    @property
    def remote_stage(self) -> int:
        """Stage index the peer announced at the handshake."""
        return self.remote.stage if self.remote else -1

    # -- writing -----------------------------------------------------------------------------------

    async def _write(self, raw: bytes, *more: bytes) -> None:
        """Write raw and then `more` back to back (one gathered stream write on the tuned transport)."""
        async with self._write_lock:
            try:
                if more:
                    await write_gather(self.stream, (raw, *more))
                else:
                    await self.stream.write(raw)
            except Exception as exc:  # libp2p raises several stream/connection error types
                err = PeerLostError(f"lost peer {self.peer} (stage {self.remote_stage}) while writing: {exc!r}",
                                    self.peer, self.remote_stage)
                self._fail(err)
                raise err from exc
        self._count_bytes(0, len(raw) + sum(len(m) for m in more))

    def _count_bytes(self, read: int, written: int) -> None:
        """Add bytes read and written to this channel's counters and to its endpoint's."""
        self.stats.bytes_in += read
        self.stats.bytes_out += written
        if self.totals is not None:
            self.totals.bytes_in += read
            self.totals.bytes_out += written

    async def write_raw(self, raw: bytes) -> None:
        """Write arbitrary bytes (tests and benchmarks use this to inject frames)."""
        await self._write(raw)

    async def send_error(self, message: str) -> None:
        """Tell the peer why something was rejected (best effort)."""
        raw = frames.encode_frame(frames.Kind.ERROR, self.local.spec_hash, self.local.stage, 0, 0, payload=message.encode())
        try:
            await self._write(raw)
        except NodeError:
            pass

    async def send_commit(self, step: int, commit: dict[int, int], yours: list[int] | None = None) -> None:
        """Tell a downstream replica which attempt of each microbatch of `step` the head committed; `yours`
        (replica_exchange = step): the committed microbatches whose gradient this replica took from that one, so it
        sums exactly those into its step bundle."""
        info: dict[str, Any] = {"step": step, "commit": sorted([mb, a] for mb, a in commit.items())}
        if yours is not None:
            info["yours"] = sorted(yours)
        body = json.dumps(info).encode()
        await self._write(frames.encode_frame(frames.Kind.COMMIT, self.local.spec_hash, self.local.stage, step, 0,
                                         payload=body))

    async def send_norm(self, step: int, phase: int, value: float) -> None:
        """Send the squared gradient norm of `step` (NORM_PARTIAL and NORM_DOWN downstream, NORM_TOTAL and
        NORM_UP upstream)."""
        self._raise_if_failed()
        await self._write(frames.encode_frame(frames.Kind.NORM, self.local.spec_hash, self.local.stage, step, phase,
                                              payload=frames.encode_norm(value)))

    def take_norm(self, step: int, phase: int) -> float | None:
        """The neighbour's squared gradient norm of `step` in `phase` if it arrived (removed), else None."""
        self._raise_if_failed()
        return self.norms.pop((step, phase), None)

    async def recv_norm(self, step: int, phase: int, timeout_s: float) -> float:
        """The neighbour's squared gradient norm of `step` (PeerLostError naming the timeout field if it is late)."""
        key = (step, phase)
        with trio.move_on_after(timeout_s):
            async with self._norms_cv:
                while key not in self.norms:
                    self._raise_if_failed()
                    await self._norms_cv.wait()
                return self.norms.pop(key)
        raise PeerLostError(f"no gradient norm of step {step} from peer {self.peer} (stage {self.remote_stage}) "
                            f"within grad_norm_timeout_s={timeout_s}", self.peer, self.remote_stage)

    async def send_data(
        self, kind: frames.Kind, step: int, microbatch: int, payload: bytes, window: bytes = b"", attempt: int = 0
    ) -> frames.FrameHeader:
        """Send one ACTIVATION/GRADIENT frame once a credit is available; returns its header."""
        if kind not in DATA_KINDS:
            raise ValueError(f"send_data takes ACTIVATION, GRADIENT or EVAL, got {kind.name}")
        self._raise_if_failed()
        if self._credit_out <= 0:
            async with self._credit_cv:
                while self._credit_out <= 0:
                    self._raise_if_failed()
                    await self._credit_cv.wait()
        self._credit_out -= 1  # no schedule point since the check: nobody took the credit meanwhile
        # with local windows the digest covers the window, but the body leaves it out (the receiver reads its own)
        body_window = window if self.spec.carries_window(kind) else b""
        header = frames.FrameHeader(
            kind=kind, spec_hash=self.local.spec_hash, stage=self.local.stage, step=step, microbatch=microbatch,
            codec=self.spec.codec, dtype=self.spec.dtype, shape=self.spec.shape, window_len=len(body_window),
            payload_len=len(payload), digest=await digest_off_loop(window, payload, self.cfg.hashes_in_thread(len(window) + len(payload))),
            attempt=attempt, id_dtype=self.spec.id_dtype,
        )
        # evaluation hops are not training work: no receipt is signed for them
        sig = b"" if kind == frames.Kind.EVAL else self.receipts.sign(header, self.remote.address if self.remote else "")
        header = frames.FrameHeader(**{**header.__dict__, "sig_len": len(sig)})
        self._pending.setdefault((step, microbatch, header.digest), []).append(header)
        self._pending_count += 1
        # credits due to the peer ride along (a CREDIT frame ahead of the data frame)
        await self._write(self._take_credit() + frames.encode_header(header) + body_window, payload, sig)
        self.stats.frames_out += 1
        return header

    async def wait_acked(self, timeout_s: float | None = None) -> None:
        """Block until every sent data frame was acknowledged (PeerLostError on timeout)."""
        limit = self.cfg.ack_timeout_s if timeout_s is None else timeout_s
        with trio.move_on_after(limit) as scope:
            async with self._acks_cv:
                while self._pending_count:
                    self._raise_if_failed()
                    await self._acks_cv.wait()
        if scope.cancelled_caught:
            raise PeerLostError(
                f"peer {self.peer} (stage {self.remote_stage}) did not acknowledge {self._pending_count} "
                f"frame(s) within ack_timeout_s={limit}", self.peer, self.remote_stage)

    async def close(self) -> None:
        """Send CLOSE and half-close our side."""
        if self.failure is None:
            raw = frames.encode_frame(frames.Kind.CLOSE, self.local.spec_hash, self.local.stage, 0, 0)
            try:
                await self._write(raw)
                await self.stream.close()
            except Exception:  # the peer may already be gone
                pass

    async def linger_and_reset(self) -> None:
        """Half-close, discard input until the peer closes or `error_linger_s` passes, then reset."""
        try:
            await self.stream.close()
            with trio.move_on_after(self.cfg.error_linger_s):
                while await self.stream.read(1 << 16):
                    pass
        except Exception:  # the peer closing or resetting is the expected way out
            pass
        try:
            await self.stream.reset()
        except Exception:
            pass

    # -- reading -----------------------------------------------------------------------------------

    async def recv_data(self, timeout_s: float) -> Received:
        """Next accepted data frame; grants the sender one more credit. PeerLostError on timeout/loss."""
        with trio.move_on_after(timeout_s) as scope:
            item = await self._inbox.receive()
        if scope.cancelled_caught:
            raise PeerLostError(
                f"no frame from peer {self.peer} (stage {self.remote_stage}) within frame_timeout_s={timeout_s}",
                self.peer, self.remote_stage)
        if isinstance(item, BaseException):
            raise item
        await self._grant_one()
        return item

    async def try_recv(self) -> Received | None:
        """The next accepted data frame if one is waiting (grants a credit), else None."""
        try:
            item = self._inbox.receive_nowait()
        except trio.WouldBlock:
            return None
        if isinstance(item, BaseException):
            raise item
        await self._grant_one()
        return item

    async def _grant_one(self) -> None:
        """Give the peer one more credit for a consumed frame.

        Sent at once when the peer has no credit left with us; otherwise it rides along the next
        ACK (or data frame) we write, saving a frame. That is never later than needed: while the
        peer holds credit it can send, and if it ran out with credit left here, frames are in
        flight whose ACKs carry it.
        """
        self._credit_due += 1
        if self._granted_left <= 0:
            await self._write(self._take_credit())

    def _take_credit(self) -> bytes:
        """The CREDIT frame granting every credit due so far (b"" if none); counts them as granted."""
        due = self._credit_due
        if not due:
            return b""
        self._credit_due = 0
        self._granted_left += due
        return frames.encode_frame(frames.Kind.CREDIT, self.local.spec_hash, self.local.stage, 0, due)

    def _notify(self) -> None:
        for fn in self.listeners:
            fn()

    def _fail(self, err: NodeError) -> None:
        if self.failure is None:
            self.failure = err
            self._inbox_send.send_nowait(err)
            self._notify()

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _wake_all(self) -> None:
        async with self._credit_cv:
            self._credit_cv.notify_all()
        async with self._acks_cv:
            self._acks_cv.notify_all()
        async with self._norms_cv:
            self._norms_cv.notify_all()

    async def run_reader(self) -> None:
        """Read frames until the stream ends; rejects bad frames (peer score drops) and fails the channel."""
        try:
            while True:
                if not await self._read_one():
                    break
        except FrameError as exc:
            self.scores.penalize(self.peer, exc.reason)
            await self.send_error(f"rejected: {exc}")
            self._fail(exc)
            await self.linger_and_reset()
        except RemoteError as exc:
            self._fail(exc)
        except PeerLostError as exc:
            self._fail(exc)
        except Exception as exc:  # stream reset / connection closed surfaces as several libp2p types
            self._fail(PeerLostError(f"lost peer {self.peer} (stage {self.remote_stage}): {exc!r}",
                                     self.peer, self.remote_stage))
        finally:
            if self.failure is None:
                err = PeerLostError(f"peer {self.peer} (stage {self.remote_stage}) closed the stream",
                                    self.peer, self.remote_stage)
                if self.closed_by_peer:
                    # orderly end (CLOSE, then EOF): frames already received stay readable and reading
                    # on returns nothing; only sending fails. A neighbour that finished its last step
                    # first must not fail ours.
                    self.failure = err
                    self._notify()
                else:
                    self._fail(err)
            await self._wake_all()

    async def _read_one(self) -> bool:
        try:
            raw = await self._reader.read_exactly(frames.HEADER_SIZE)
        except EOFError as exc:
            if exc.args and exc.args[0]:
                raise TruncatedFrameError(f"stream ended inside a header ({exc.args[0]} bytes)") from exc
            if self.closed_by_peer:
                return False
            raise PeerLostError(f"peer {self.peer} (stage {self.remote_stage}) closed the stream",
                                self.peer, self.remote_stage) from exc
        h = frames.decode_header(raw, self.cfg.max_frame_bytes)
        frames.check_spec_hash(h, self.local.spec_hash)
        if h.kind not in DATA_KINDS and frames.HEADER_SIZE + h.body_len > MAX_CONTROL_BYTES:
            raise FrameTooLargeError(f"{h.kind.name.lower()} frame of {frames.HEADER_SIZE + h.body_len} bytes declared, "
                                     f"control frames are limited to {MAX_CONTROL_BYTES}")
        if h.kind in DATA_KINDS:
            self._check_direction(h)
            frames.check_data_header(h, self.spec)
            if self._granted_left <= 0:
                raise UnexpectedFrameError(f"peer {self.peer} sent a frame beyond its {self.cfg.credits} credits")
        try:
            window, payload, sig = await self._reader.read_parts((h.window_len, h.payload_len, h.sig_len))
        except EOFError as exc:
            got = exc.args[0] if exc.args else 0
            raise TruncatedFrameError(
                f"{h.kind.name.lower()} frame truncated: {got} of {h.body_len} body bytes arrived") from exc
        self._count_bytes(frames.HEADER_SIZE + h.body_len, 0)
        fr = frames.Frame(header=h, window=window, payload=payload, signature=sig)
        if h.kind in DATA_KINDS:
            await self._accept_data(fr)
            return True
        frames.verify_digest(h, window, payload)  # control bodies are small (MAX_CONTROL_BYTES)
        if h.kind == frames.Kind.ACK:
            await self._on_ack(fr)
        elif h.kind == frames.Kind.CREDIT:
            self._credit_out += h.microbatch
            await _notify_all(self._credit_cv)
        elif h.kind == frames.Kind.ERROR:
            raise RemoteError(f"peer {self.peer} (stage {self.remote_stage}) reported: "
                              f"{fr.payload.decode(errors='replace')}")
        elif h.kind == frames.Kind.CLOSE:
            self.closed_by_peer = True
        elif h.kind == frames.Kind.COMMIT:
            self._accept_commit(fr)
        elif h.kind == frames.Kind.NORM:
            await self._accept_norm(fr)
        else:
            raise UnexpectedFrameError(f"unexpected {h.kind.name} frame after the handshake")
        return True

    def _check_direction(self, h: frames.FrameHeader) -> None:
        want_from = self.local.stage - 1 if h.kind in frames.FORWARD_KINDS else self.local.stage + 1
        if h.stage != self.remote_stage or h.stage != want_from:
            raise UnexpectedFrameError(
                f"{h.kind.name.lower()} frame from stage {h.stage} (peer announced stage {self.remote_stage}); "
                f"stage {self.local.stage} accepts it only from stage {want_from}")

    def _accept_commit(self, fr: frames.Frame) -> None:
        if self.remote_stage != self.local.stage - 1:
            raise UnexpectedFrameError(f"commit frame from stage {self.remote_stage}; stage {self.local.stage} "
                                       f"accepts it only from stage {self.local.stage - 1}")
        try:
            info = json.loads(fr.payload)
            commit = {int(mb): int(a) for mb, a in info["commit"]}
            step = int(info["step"])
            yours = None if info.get("yours") is None else {int(mb) for mb in info["yours"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise UnexpectedFrameError(f"malformed commit frame: {exc}") from exc
        if yours is not None and not yours <= set(commit):
            raise UnexpectedFrameError(f"malformed commit frame: 'yours' names microbatches {sorted(yours - set(commit))[:8]} "
                                       "the commit does not hold")
        self.commits.append({"step": step, "commit": commit, "yours": yours})
        self._notify()

    async def _accept_norm(self, fr: frames.Frame) -> None:
        h = fr.header
        # synchronous schedules: partial sums come from the previous stage, the total from the next one;
        # the async schedule runs the other way (partial sums from the next stage, the total from the previous)
        up, down = self.local.stage - 1, self.local.stage + 1
        want = {frames.NORM_PARTIAL: up, frames.NORM_TOTAL: down, frames.NORM_UP: down,
                frames.NORM_DOWN: up}.get(h.microbatch)
        if want is None or h.stage != self.remote_stage or h.stage != want:
            raise UnexpectedFrameError(f"norm frame (phase {h.microbatch}) from stage {h.stage}; stage "
                                       f"{self.local.stage} takes partial sums from stage {up} (sync) or {down} "
                                       f"(async) and totals from stage {down} (sync) or {up} (async)")
        if (h.step, h.microbatch) in self.norms:
            raise UnexpectedFrameError(f"second norm frame for step {h.step} phase {h.microbatch}")
        if len(self.norms) >= self.cfg.max_pending_norms:
            raise UnexpectedFrameError(f"norm frame for step {h.step}: {len(self.norms)} norms from peer {self.peer} "
                                       f"are unclaimed already (transport.max_pending_norms="
                                       f"{self.cfg.max_pending_norms})")
        self.norms[(h.step, h.microbatch)] = frames.decode_norm(fr.payload)
        await _notify_all(self._norms_cv)
        self._notify()

    async def _accept_data(self, fr: frames.Frame) -> None:
        peer_addr = self.remote.address if self.remote else ""
        if not self.spec.carries_window(fr.header.kind) and fr.header.kind == frames.Kind.ACTIVATION:
            if self.window_source is None:
                raise UnexpectedFrameError("activation frame without a token window, and this node has no dataset "
                                           "to read it from")
        if (self.decoder is not None or self.window_source is not None
                or self.cfg.hashes_in_thread(fr.header.window_len + fr.header.payload_len)):
            fr, value = await trio.to_thread.run_sync(verify_and_decode, fr, self.decoder,  # one hop per frame
                                                      self.window_source)
        else:
            fr, value = verify_and_decode(fr, None)
        counter = b"" if fr.header.kind == frames.Kind.EVAL else self.receipts.countersign(fr.header, fr.signature,
                                                                                            peer_addr)
        self._granted_left -= 1
        self.stats.frames_in += 1
        ack = frames.encode_frame(frames.Kind.ACK, self.local.spec_hash, self.local.stage, fr.header.step,
                             fr.header.microbatch, payload=fr.header.digest + counter)
        await self._write(ack + self._take_credit())  # credits consumed since the last ACK ride along
        self._inbox_send.send_nowait(Received(frame=fr, value=value))
        self._notify()

    async def _on_ack(self, fr: frames.Frame) -> None:
        acked = fr.payload[: frames.DIGEST_SIZE]
        waiting = self._pending.get((fr.header.step, fr.header.microbatch, acked))
        if not waiting:
            raise UnexpectedFrameError(f"ack for unknown frame step {fr.header.step} mb {fr.header.microbatch} "
                                       f"digest 0x{acked.hex()[:16]}")
        header = waiting.pop(0)
        if not waiting:
            del self._pending[(fr.header.step, fr.header.microbatch, acked)]
        self._pending_count -= 1
        if header.kind != frames.Kind.EVAL:
            self.receipts.on_ack(header, fr.payload[frames.DIGEST_SIZE:], self.remote.address if self.remote else "")
        await _notify_all(self._acks_cv)


class ActEndpoint:
    """Serves `/pmn/act/1.0.0` on a host and opens channels to neighbours."""

    def __init__(
        self,
        host: Any,
        *,
        local: LocalInfo,
        frame_spec: frames.FrameSpec,
        cfg: TransportConfig,
        receipts: ReceiptHook | None = None,
        decoder: Callable[[frames.Frame], Any] | None = None,
        step_fn: Callable[[], int] | None = None,
        policy: AccessPolicy | None = None,
        window_source: Callable[[int, int], bytes] | None = None,
        scores: PeerScores | None = None,
    ) -> None:
        self.host = host
        self.window_source = window_source  # token windows from this node's dataset (FrameSpec.local_windows)
        self.step_fn = step_fn
        # on-chain mode: a neighbour must be registered for the stage it claims (checked after the HELLO
        # exchange, before any data frame); None: every peer whose handshake matches the model
        self.policy = policy
        self.local = local
        self.spec = frame_spec
        self.cfg = cfg
        self.receipts = receipts
        self.decoder = decoder
        self.scores = scores if scores is not None else peer_scores(cfg)  # shared with the node's other protocols
        self.totals = ChannelStats()  # bytes of every channel this endpoint accepted or opened, closed ones too
        self._incoming_send, self.incoming = trio.open_memory_channel[ActChannel](math.inf)
        self.handshake_failures: list[str] = []  # messages of refused inbound handshakes
        host.set_stream_handler(ACT_PROTOCOL, self._handle)

    def _channel(self, stream: INetStream) -> ActChannel:
        return ActChannel(stream, local=self.local, frame_spec=self.spec, cfg=self.cfg, scores=self.scores,
                          receipts=self.receipts, decoder=self.decoder, step_fn=self.step_fn,
                          window_source=self.window_source, totals=self.totals)

    async def _handle(self, stream: INetStream) -> None:
        ch = self._channel(stream)
        if self.scores.is_banned(ch.peer):
            await ch.send_error(f"peer {ch.peer} is banned (too many rejected frames or refused requests)")
            await ch.linger_and_reset()
            return
        try:
            await ch.handshake(initiator=False)
            await self._authorize(ch)
        except (NodeError, trio.TooSlowError) as exc:
            self.handshake_failures.append(str(exc))
            await ch.linger_and_reset()
            return
        await self._incoming_send.send(ch)
        await ch.run_reader()

    async def open(self, peer_addr: str | Any) -> ActChannel:
        """Connect to a peer (multiaddr string with /p2p/ or PeerInfo) and handshake; run its reader next."""
        from node.net.host import parse_peer_addr

        info = parse_peer_addr(peer_addr) if isinstance(peer_addr, str) else peer_addr
        if self.scores.is_banned(info.peer_id.pretty()):
            raise PeerBannedError(f"peer {info.peer_id.pretty()} is banned")
        with trio.fail_after(self.cfg.dial_timeout_s):
            await self.host.connect(info)
            stream = await self.host.new_stream(info.peer_id, [ACT_PROTOCOL])
        ch = self._channel(stream)
        await ch.handshake(initiator=True)
        try:
            await self._authorize(ch)
        except NotAuthorizedError:
            await ch.linger_and_reset()
            raise
        return ch

    async def _authorize(self, ch: ActChannel) -> None:
        """The policy's verdict on a handshaken peer (its verified binding handed over first); a refusal is
        sent to the peer, counted against it and raised as NotAuthorizedError."""
        if self.policy is None or ch.remote is None:
            return
        pid = ch.stream.muxed_conn.peer_id
        if ch.remote.address:
            self.policy.note_binding(pid, ch.remote.address, ch.remote.binding)
        try:
            await self.policy.check(pid, ACT, ch.remote.stage)
        except NotAuthorizedError as exc:
            if exc.peer_at_fault:  # a chain outage is not
                self.scores.penalize(ch.peer, "not_authorized")
            await ch.send_error("not authorized")
            raise
