"""Paid inference through the pipeline: `/pmn/infer/1.0.0`.

A client opens a stream to a head-stage peer and sends a GENERATE request carrying the payment's
transaction hash and request id. Every stage checks the payment with its `PaymentVerifier` (backed by
the chain in production) before it computes anything, so no stage serves an unpaid request. The head
embeds the prompt and passes the boundary state stage by stage (HOP messages over one stream per
neighbour for the life of the request); the tail returns the greedy next token, which travels back and
is streamed to the client (TOKEN), until `max_new_tokens` or the context is full (DONE).

Messages: a 4-byte big-endian header length, a UTF-8 JSON header, a 4-byte body length, the body. Both
lengths are checked against `InferenceConfig.max_message_bytes` before anything else is read.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio
from libp2p.custom_types import TProtocol

from node.errors import NodeError, NotAuthorizedError, PeerRefusedError
from node.net import msgio
from node.net.access import INFER, AccessPolicy
from node.net.gate import ProtocolGate, reset_quietly
from node.net.peerscore import PeerGuardConfig, PeerScores
from sharding.codecs import Codec
from sharding.config import ModelConfig
from sharding.stage import StageModule
from sharding.stagespec import StageSpec

INFER_PROTOCOL = TProtocol("/pmn/infer/1.0.0")


class InferenceError(NodeError):
    """An inference request failed; the message says where and why."""


class UnpaidRequestError(InferenceError):
    """The request's payment is missing, too small, for another request, or already used."""


@dataclass
class InferenceConfig:
    """Limits and timeouts of the inference protocol."""

    max_message_bytes: int = 8 * 1024 * 1024  # largest header or body accepted, checked before reading it
    max_new_tokens: int = 256  # most tokens one request may ask for
    hop_timeout_s: float = 30.0  # longest wait for the next stage's answer to one hop
    request_timeout_s: float = 300.0  # longest a whole generation may take
    dial_timeout_s: float = 10.0  # time allowed to open a stream to the next stage
    max_header_bytes: int = 64 * 1024  # largest request header a stage reads (token ids, payment), checked first
    max_depth: int = 3  # deepest JSON nesting of a header
    idle_timeout_s: float = 60.0  # a stage closes a stream that sends nothing for this long (a hop waits for
    # the stages after it and the head's next token: keep it above hop_timeout_s)
    max_tracked_requests: int = 100_000  # request ids remembered as used per stage (oldest forgotten first)
    guard: PeerGuardConfig = field(default_factory=lambda: PeerGuardConfig(max_streams_per_peer=32,
                                                                          max_streams_total=256))  # scores, bans,
    # stream caps (the previous stage opens one stream per concurrent request)

    def limits(self) -> msgio.MessageLimits:
        """What a stage reads of one message."""
        return msgio.MessageLimits(max_header_bytes=self.max_header_bytes, max_body_bytes=self.max_message_bytes,
                                   max_depth=self.max_depth, idle_timeout_s=self.idle_timeout_s).validate()


class PaymentVerifier(Protocol):
    """Checks that `tx_hash` paid at least the model's fee for `request_id` (raises UnpaidRequestError)."""

    def verify(self, request_id: bytes, tx_hash: bytes) -> None: ...


class OpenPayments:
    """A verifier that accepts every request (local experiments without a chain; never in `pmn demo`)."""

    def verify(self, request_id: bytes, tx_hash: bytes) -> None:
        return None


async def write_message(stream: Any, header: dict[str, Any], body: bytes = b"") -> None:
    """Send one message (node.net.msgio framing)."""
    await msgio.write_message(stream, header, body)


async def read_message(stream: Any, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Receive one message; oversized or malformed messages raise InferenceError before the part is read."""
    return await msgio.read_message(stream, max_bytes, InferenceError)


def _hex32(header: dict[str, Any], key: str) -> bytes:
    value = header.get(key)
    try:
        raw = bytes.fromhex(str(value).removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise InferenceError(f"field '{key}' must be 32 bytes of hex, got {value!r}")
    return raw


def _ids(header: dict[str, Any], config: ModelConfig) -> torch.Tensor:
    ids = header.get("ids")
    if (not isinstance(ids, list) or not ids or len(ids) > config.seq_len
            or not all(isinstance(t, int) and 0 <= t < config.vocab_size for t in ids)):
        raise InferenceError(f"field 'ids' must be 1..{config.seq_len} token ids in [0, {config.vocab_size})")
    return torch.tensor([ids], dtype=torch.long)


@dataclass(frozen=True)
class Sampling:
    """How the tail stage picks the next token (optional `sampling` object of a GENERATE, forwarded in hops)."""

    temperature: float = 0.0  # softmax temperature; 0 = greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens only (0 = all)
    seed: int = 0  # seed of the draw: the same request and tokens give the same text

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "seed": self.seed}


MAX_TEMPERATURE = 10.0  # largest sampling temperature a stage accepts


def _sampling(header: dict[str, Any], vocab_size: int) -> Sampling | None:
    raw = header.get("sampling")
    if raw is None:
        return None
    t, k, seed = (raw.get(x) if isinstance(raw, dict) else None for x in ("temperature", "top_k", "seed"))
    if (not isinstance(t, int | float) or isinstance(t, bool) or not 0 <= t <= MAX_TEMPERATURE
            or not isinstance(k, int) or not 0 <= k <= vocab_size or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InferenceError(f"field 'sampling' must be {{temperature: 0..{MAX_TEMPERATURE}, top_k: 0..{vocab_size}, "
                             "seed: 0..2^63-1}")
    return Sampling(float(t), k, seed)


def pick_token(logits: torch.Tensor, sampling: Sampling | None, ids: list[int]) -> int:
    """The next token from the last position's logits: argmax, or a seeded draw at the request's temperature
    among its top-k tokens (the draw depends on the seed and the tokens so far, so it is reproducible)."""
    if sampling is None or sampling.temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scaled.numel():
        cut = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < cut, float("-inf"))
    digest = hashlib.blake2b(repr((sampling.seed, ids)).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen))


NextHop = Callable[[], Awaitable[Any]]  # opens a stream to a peer of the next stage


class _DownstreamError(InferenceError):
    """A later stage refused or failed a forwarded hop (not the fault of the peer that sent it here)."""


@dataclass
class _Session:
    """The request one inference stream carries (a stage serves one request per stream)."""

    request_id: bytes | None = None  # set by the first hop, whose payment was checked
    hops: int = 0  # hops served on this stream
    ids: list[int] = field(default_factory=list)  # token window of the last hop


def _extends(prev: list[int], ids: list[int], seq_len: int) -> bool:
    """Whether `ids` is `prev` plus one token, windowed to the last `seq_len` tokens."""
    kept = prev[1:] if len(prev) >= seq_len else prev  # a full window drops its oldest token
    return len(ids) == len(kept) + 1 and ids[:-1] == kept


class InferenceService:
    """Serves `/pmn/infer/1.0.0` for one stage of one model."""

    def __init__(self, config: ModelConfig, spec: StageSpec, module: StageModule, codec: Codec,
                 verifier: PaymentVerifier, next_hop: NextHop | None, cfg: InferenceConfig | None = None,
                 module_lock: Any = None, policy: AccessPolicy | None = None, scores: PeerScores | None = None) -> None:
        if not spec.is_last and next_hop is None:
            raise ValueError(f"stage {spec.index} is not the tail: it needs a next_hop to forward requests")
        self.config = config
        self.spec = spec
        self.module = module
        self.codec = codec
        self.verifier = verifier
        self.next_hop = next_hop
        self.cfg = cfg or InferenceConfig()
        self.module_lock = module_lock  # a threading.Lock shared with training, if any
        # request ids this stage served, head or not: one payment buys one request, served once per stage
        self.served_requests: OrderedDict[bytes, None] = OrderedDict()
        self.rejected = 0  # requests refused (payment, replay, authorization or malformed)
        self.gate = ProtocolGate(INFER, policy, self.cfg.guard, scores)  # policy, bans, stream caps
        self._limits = self.cfg.limits()
        self.tokens_served = 0  # tokens this stage helped produce

    # -- compute (off the event loop) -------------------------------------------------------------

    def _run(self, ids: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        def go() -> torch.Tensor:
            device = next(self.module.parameters()).device  # the stage's device (--device)
            with torch.no_grad():
                return self.module(ids.to(device), None if h is None else h.to(device))

        if self.module_lock is None:
            return go()
        with self.module_lock:
            return go()

    async def _compute(self, ids: torch.Tensor, body: bytes, sampling: Sampling | None = None) -> tuple[str, Any]:
        """This stage's share of one token: ('token', id) at the tail, else ('act', encoded payload)."""

        def work() -> tuple[str, Any]:
            h = None if self.spec.is_first else self.codec.decode_activation(body, ids)
            out = self._run(ids, h)
            if self.spec.is_last:
                return "token", pick_token(out[0, -1], sampling, ids[0].tolist())
            return "act", self.codec.encode_activation(out, ids)

        return await trio.to_thread.run_sync(work)

    # -- protocol ---------------------------------------------------------------------------------

    async def handle(self, stream: Any) -> None:
        """Stream handler: a GENERATE (head) or a sequence of HOPs of one request (other stages).

        Each header is read (bounded) first; the policy is asked before a body byte is read (hops: the
        sender must serve the previous stage), and a body is read only for a hop."""
        try:
            async with self.gate.serve(stream) as peer:
                await self._serve(stream, peer)
        except PeerRefusedError:
            return
        except Exception:  # a reset stream: nothing more to answer
            await reset_quietly(stream)

    async def _serve(self, stream: Any, peer: Any) -> None:
        downstream = None
        session = _Session()
        try:
            with trio.fail_after(self.cfg.request_timeout_s):
                while True:
                    try:
                        header, blen = await msgio.read_header(stream, self._limits, InferenceError)
                    except InferenceError as exc:
                        if msgio.is_clean_end(exc):
                            return
                        raise
                    kind = header.get("type")
                    if kind == "hop":
                        await self.gate.authorize(peer, self.spec.index)
                        body = await msgio.read_body(stream, blen, self._limits, InferenceError)
                        downstream = await self._hop(stream, header, body, downstream, session)
                        continue
                    if blen:
                        raise InferenceError(f"a {str(kind)[:16]!r} message carries no body, this one declares {blen} "
                                             "bytes")
                    if kind == "limits":  # free: lets a client check its request before it pays
                        await write_message(stream, self.limits())
                        continue
                    if kind == "generate":
                        await self.gate.authorize(peer, None)
                        await self._generate(stream, header)
                        return
                    raise InferenceError(f"unknown message type {str(kind)[:32]!r}: expected 'limits', 'generate' "
                                         "or 'hop'")
        except (InferenceError, NotAuthorizedError, trio.TooSlowError) as exc:
            self.rejected += 1
            if isinstance(exc, InferenceError) and not isinstance(exc, _DownstreamError):
                self.gate.refuse(peer, type(exc).__name__)
            msg = "not authorized" if isinstance(exc, NotAuthorizedError) else str(exc) or "request timed out"
            try:
                await write_message(stream, {"type": "error", "stage": self.spec.index, "message": msg})
            except Exception:
                pass
        except Exception as exc:  # a broken peer must never take the node down
            try:
                await write_message(stream, {"type": "error", "stage": self.spec.index,
                                             "message": f"{type(exc).__name__}: {exc}"})
            except Exception:
                pass
        finally:
            for s in (downstream, stream):
                if s is not None:
                    try:
                        await s.close()
                    except Exception:
                        pass

    def limits(self) -> dict[str, Any]:
        """What a request to this stage may ask: the LIMITS reply."""
        return {"type": "limits", "stage": self.spec.index, "seq_len": self.config.seq_len,
                "vocab_size": self.config.vocab_size, "max_new_tokens": self.cfg.max_new_tokens}

    def _check_payment(self, header: dict[str, Any]) -> tuple[bytes, bytes]:
        request_id, tx_hash = _hex32(header, "request_id"), _hex32(header, "tx_hash")
        self.verifier.verify(request_id, tx_hash)
        return request_id, tx_hash

    def _claim(self, request_id: bytes) -> None:
        """Mark a request id as served here (UnpaidRequestError when it already was: a replayed payment)."""
        if request_id in self.served_requests:
            raise UnpaidRequestError(f"request 0x{request_id.hex()} was already served: pay for a new request id")
        self.served_requests[request_id] = None
        while len(self.served_requests) > self.cfg.max_tracked_requests:
            self.served_requests.popitem(last=False)

    async def _hop(self, stream: Any, header: dict[str, Any], body: bytes, downstream: Any,
                   session: _Session) -> Any:
        if self.spec.is_first:
            raise InferenceError("the head stage accepts 'generate' requests, not hops")
        ids = _ids(header, self.config)
        if session.request_id is None:  # the first hop of a request: its payment, once per stage
            request_id, _ = self._check_payment(header)
            self._claim(request_id)
            session.request_id = request_id
        else:
            if _hex32(header, "request_id") != session.request_id:
                raise InferenceError("every hop on one stream must belong to the same request")
            if session.hops >= self.cfg.max_new_tokens:
                raise UnpaidRequestError(f"request 0x{session.request_id.hex()} already had "
                                         f"{self.cfg.max_new_tokens} hops (max_new_tokens)")
            if not _extends(session.ids, ids[0].tolist(), self.config.seq_len):
                raise InferenceError("a hop's tokens must extend the previous hop's by one generated token")
        session.hops += 1
        session.ids = ids[0].tolist()
        kind, value = await self._compute(ids, body, _sampling(header, self.config.vocab_size))
        if kind == "token":
            self.tokens_served += 1
            await write_message(stream, {"type": "token", "token": value})
            return downstream
        downstream = downstream or await self._open_next()
        token = await self._forward(downstream, header, value)
        self.tokens_served += 1
        await write_message(stream, {"type": "token", "token": token})
        return downstream

    async def _open_next(self) -> Any:
        assert self.next_hop is not None
        with trio.fail_after(self.cfg.dial_timeout_s):
            return await self.next_hop()

    async def _forward(self, downstream: Any, header: dict[str, Any], payload: bytes) -> int:
        with trio.fail_after(self.cfg.hop_timeout_s):
            await write_message(downstream, {**header, "type": "hop"}, payload)
            reply, _ = await read_message(downstream, self.cfg.max_message_bytes)
        if reply.get("type") == "error":
            raise _DownstreamError(f"stage {reply.get('stage')}: {reply.get('message')}")
        token = reply.get("token")
        if reply.get("type") != "token" or not isinstance(token, int) or not 0 <= token < self.config.vocab_size:
            raise InferenceError(f"stage {self.spec.index + 1} sent an invalid reply {reply!r}")
        return token

    async def _generate(self, stream: Any, header: dict[str, Any]) -> None:
        if not self.spec.is_first:
            raise InferenceError(f"stage {self.spec.index} is not the head: send 'generate' to a stage-0 peer")
        request_id, tx_hash = self._check_payment(header)
        if request_id in self.served_requests:
            raise UnpaidRequestError(f"request 0x{request_id.hex()} was already served: pay for a new request id")
        n_new = header.get("max_new_tokens")
        if not isinstance(n_new, int) or not 1 <= n_new <= self.cfg.max_new_tokens:
            raise InferenceError(f"field 'max_new_tokens' must be an integer in 1..{self.cfg.max_new_tokens}")
        ids = _ids(header, self.config)[0].tolist()
        sampling = _sampling(header, self.config.vocab_size)
        self._claim(request_id)
        downstream = None if self.spec.is_last else await self._open_next()
        try:
            for _ in range(n_new):
                window = torch.tensor([ids[-self.config.seq_len:]], dtype=torch.long)
                kind, value = await self._compute(window, b"", sampling)
                if kind == "act":
                    hop = {"request_id": header["request_id"], "tx_hash": header["tx_hash"],
                           "ids": window[0].tolist(), **({} if sampling is None else {"sampling": sampling.to_json()})}
                    value = await self._forward(downstream, hop, value)
                self.tokens_served += 1
                ids.append(int(value))
                await write_message(stream, {"type": "token", "token": int(value)})
            await write_message(stream, {"type": "done", "tokens": n_new})
        finally:
            if downstream is not None:
                await downstream.close()


async def request_limits(stream: Any, cfg: InferenceConfig | None = None) -> dict[str, int]:
    """Client side: ask a stage (free of charge) for its limits: seq_len, vocab_size, max_new_tokens.

    The stream stays open for the GENERATE that follows."""
    cfg = cfg or InferenceConfig()
    await write_message(stream, {"type": "limits"})
    with trio.fail_after(cfg.request_timeout_s):
        header, _ = await read_message(stream, cfg.max_message_bytes)
    if header.get("type") == "error":
        raise InferenceError(f"stage {header.get('stage')} refused the limits request: {header.get('message')}")
    out = {k: header.get(k) for k in ("seq_len", "vocab_size", "max_new_tokens")}
    if header.get("type") != "limits" or not all(isinstance(v, int) and v > 0 for v in out.values()):
        raise InferenceError(f"unexpected reply to a limits request: {header!r}")
    return {k: int(v) for k, v in out.items()}  # type: ignore[arg-type]


def check_request(limits: dict[str, int], prompt_ids: list[int], max_new_tokens: int) -> None:
    """InferenceError naming the problem when a request would be refused by a stage with these limits."""
    if not prompt_ids or len(prompt_ids) > limits["seq_len"]:
        raise InferenceError(f"the prompt is {len(prompt_ids)} tokens; the model takes 1..{limits['seq_len']} "
                             "(its context length): shorten it")
    bad = [t for t in prompt_ids if not 0 <= t < limits["vocab_size"]]
    if bad:
        raise InferenceError(f"token id {bad[0]} is outside the model's vocabulary of {limits['vocab_size']}")
    if not 1 <= max_new_tokens <= limits["max_new_tokens"]:
        raise InferenceError(f"max_new_tokens must be in 1..{limits['max_new_tokens']} for this stage, "
                             f"got {max_new_tokens}")


async def generate(open_stream: Callable[[], Awaitable[Any]], prompt_ids: list[int], *, request_id: bytes,
                   tx_hash: bytes, max_new_tokens: int, cfg: InferenceConfig | None = None,
                   sampling: Sampling | None = None) -> AsyncIterator[int]:
    """Client side: send a paid GENERATE to a head-stage peer and yield tokens as they arrive (greedy, or
    drawn as `sampling` says)."""
    cfg = cfg or InferenceConfig()
    stream = await open_stream()
    try:
        await write_message(stream, {"type": "generate", "request_id": "0x" + request_id.hex(),
                                     "tx_hash": "0x" + tx_hash.hex(), "ids": prompt_ids,
                                     "max_new_tokens": max_new_tokens,
                                     **({} if sampling is None else {"sampling": sampling.to_json()})})
        with trio.fail_after(cfg.request_timeout_s):
            while True:
                header, _ = await read_message(stream, cfg.max_message_bytes)
                kind = header.get("type")
                if kind == "token":
                    yield int(header["token"])
                elif kind == "done":
                    return
                elif kind == "error":
                    raise InferenceError(f"stage {header.get('stage')} refused the request: {header.get('message')}")
                else:
                    raise InferenceError(f"unexpected message {kind!r} from the head stage")
    finally:
        await stream.close()


@asynccontextmanager
async def head_stream_opener(head_addr: str) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """A throwaway client host on 127.0.0.1 and a function opening `/pmn/infer/1.0.0` streams to `head_addr`."""
    import multiaddr

    from node.net.host import make_host, parse_peer_addr
    from node.net.identity import identity_from_secret
    from node.net.running import run_host

    info = parse_peer_addr(head_addr)
    host = make_host(identity_from_secret(os.urandom(31).rjust(32, b"\x01")))
    async with run_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async def open_stream() -> Any:
            await host.connect(info)
            return await host.new_stream(info.peer_id, [INFER_PROTOCOL])

        yield open_stream
