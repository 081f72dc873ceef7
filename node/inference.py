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

import json
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import trio
from libp2p.custom_types import TProtocol

from node.errors import NodeError
from sharding.codecs import Codec
from sharding.config import ModelConfig
from sharding.partition import StageSpec
from sharding.stage import StageModule

INFER_PROTOCOL = TProtocol("/pmn/infer/1.0.0")
_LEN = struct.Struct(">I")


class InferenceError(NodeError):
    """An inference request failed; the message says where and why."""


class PaymentError(InferenceError):
    """The request's payment is missing, too small, for another request, or already used."""


@dataclass
class InferenceConfig:
    """Limits and timeouts of the inference protocol."""

    max_message_bytes: int = 8 * 1024 * 1024  # largest header or body accepted, checked before reading it
    max_new_tokens: int = 256  # most tokens one request may ask for
    hop_timeout_s: float = 30.0  # longest wait for the next stage's answer to one hop
    request_timeout_s: float = 300.0  # longest a whole generation may take
    dial_timeout_s: float = 10.0  # time allowed to open a stream to the next stage


class PaymentVerifier(Protocol):
    """Checks that `tx_hash` paid at least the model's fee for `request_id` (raises PaymentError)."""

    def verify(self, request_id: bytes, tx_hash: bytes) -> None: ...


class OpenPayments:
    """A verifier that accepts every request (local experiments without a chain; never in `pmn demo`)."""

    def verify(self, request_id: bytes, tx_hash: bytes) -> None:
        return None


async def _read_exact(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except EOFError:
            chunk = b""
        if not chunk:
            raise InferenceError(f"stream closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def write_message(stream: Any, header: dict[str, Any], body: bytes = b"") -> None:
    """Send one message."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    await stream.write(_LEN.pack(len(raw)) + raw + _LEN.pack(len(body)) + body)


async def read_message(stream: Any, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Receive one message; oversized or malformed messages raise InferenceError before the body is read."""
    (hlen,) = _LEN.unpack(await _read_exact(stream, 4))
    if hlen > max_bytes:
        raise InferenceError(f"header of {hlen} bytes exceeds the limit of {max_bytes}")
    try:
        header = json.loads(await _read_exact(stream, hlen))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferenceError(f"malformed message header: {exc}") from None
    if not isinstance(header, dict) or "type" not in header:
        raise InferenceError("malformed message header: expected an object with a 'type'")
    (blen,) = _LEN.unpack(await _read_exact(stream, 4))
    if blen > max_bytes:
        raise InferenceError(f"body of {blen} bytes exceeds the limit of {max_bytes}")
    return header, await _read_exact(stream, blen)


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


NextHop = Callable[[], Awaitable[Any]]  # opens a stream to a peer of the next stage


class InferenceService:
    """Serves `/pmn/infer/1.0.0` for one stage of one model."""

    def __init__(self, config: ModelConfig, spec: StageSpec, module: StageModule, codec: Codec,
                 verifier: PaymentVerifier, next_hop: NextHop | None, cfg: InferenceConfig | None = None,
                 module_lock: Any = None) -> None:
        if not spec.is_tail and next_hop is None:
            raise ValueError(f"stage {spec.index} is not the tail: it needs a next_hop to forward requests")
        self.config = config
        self.spec = spec
        self.module = module
        self.codec = codec
        self.verifier = verifier
        self.next_hop = next_hop
        self.cfg = cfg or InferenceConfig()
        self.module_lock = module_lock  # a threading.Lock shared with training, if any
        self.served_requests: set[bytes] = set()  # request ids generated by this head (one payment, one request)
        self.rejected = 0  # requests refused (payment or malformed)
        self.tokens_served = 0  # tokens this stage helped produce

    # -- compute (off the event loop) -------------------------------------------------------------

    def _run(self, ids: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        def go() -> torch.Tensor:
            with torch.no_grad():
                return self.module(ids, h)

        if self.module_lock is None:
            return go()
        with self.module_lock:
            return go()

    async def _compute(self, ids: torch.Tensor, body: bytes) -> tuple[str, Any]:
        """This stage's share of one token: ('token', id) at the tail, else ('act', encoded payload)."""

        def work() -> tuple[str, Any]:
            h = None if self.spec.is_head else self.codec.decode_activation(body, ids)
            out = self._run(ids, h)
            if self.spec.is_tail:
                return "token", int(out[0, -1].argmax())
            return "act", self.codec.encode_activation(out, ids)

        return await trio.to_thread.run_sync(work)

    # -- protocol ---------------------------------------------------------------------------------

    async def handle(self, stream: Any) -> None:
        """Stream handler: a GENERATE (head) or a sequence of HOPs (other stages)."""
        downstream = None
        try:
            with trio.fail_after(self.cfg.request_timeout_s):
                while True:
                    try:
                        header, body = await read_message(stream, self.cfg.max_message_bytes)
                    except InferenceError:
                        return
                    kind = header.get("type")
                    if kind == "generate":
                        await self._generate(stream, header)
                        return
                    if kind != "hop":
                        raise InferenceError(f"unknown message type {kind!r}: expected 'generate' or 'hop'")
                    downstream = await self._hop(stream, header, body, downstream)
        except (InferenceError, trio.TooSlowError) as exc:
            self.rejected += 1
            msg = str(exc) or "request timed out"
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

    def _check_payment(self, header: dict[str, Any]) -> tuple[bytes, bytes]:
        request_id, tx_hash = _hex32(header, "request_id"), _hex32(header, "tx_hash")
        self.verifier.verify(request_id, tx_hash)
        return request_id, tx_hash

    async def _hop(self, stream: Any, header: dict[str, Any], body: bytes, downstream: Any) -> Any:
        if self.spec.is_head:
            raise InferenceError("the head stage accepts 'generate' requests, not hops")
        self._check_payment(header)
        ids = _ids(header, self.config)
        kind, value = await self._compute(ids, body)
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
            raise InferenceError(f"stage {reply.get('stage')}: {reply.get('message')}")
        token = reply.get("token")
        if reply.get("type") != "token" or not isinstance(token, int) or not 0 <= token < self.config.vocab_size:
            raise InferenceError(f"stage {self.spec.index + 1} sent an invalid reply {reply!r}")
        return token

    async def _generate(self, stream: Any, header: dict[str, Any]) -> None:
        if not self.spec.is_head:
            raise InferenceError(f"stage {self.spec.index} is not the head: send 'generate' to a stage-0 peer")
        request_id, tx_hash = self._check_payment(header)
        if request_id in self.served_requests:
            raise PaymentError(f"request 0x{request_id.hex()} was already served: pay for a new request id")
        n_new = header.get("max_new_tokens")
        if not isinstance(n_new, int) or not 1 <= n_new <= self.cfg.max_new_tokens:
            raise InferenceError(f"field 'max_new_tokens' must be an integer in 1..{self.cfg.max_new_tokens}")
        ids = _ids(header, self.config)[0].tolist()
        self.served_requests.add(request_id)
        downstream = None if self.spec.is_tail else await self._open_next()
        try:
            for _ in range(n_new):
                window = torch.tensor([ids[-self.config.seq_len:]], dtype=torch.long)
                kind, value = await self._compute(window, b"")
                if kind == "act":
                    hop = {"request_id": header["request_id"], "tx_hash": header["tx_hash"],
                           "ids": window[0].tolist()}
                    value = await self._forward(downstream, hop, value)
                self.tokens_served += 1
                ids.append(int(value))
                await write_message(stream, {"type": "token", "token": int(value)})
            await write_message(stream, {"type": "done", "tokens": n_new})
        finally:
            if downstream is not None:
                await downstream.close()


async def generate(open_stream: Callable[[], Awaitable[Any]], prompt_ids: list[int], *, request_id: bytes,
                   tx_hash: bytes, max_new_tokens: int, cfg: InferenceConfig | None = None) -> AsyncIterator[int]:
    """Client side: send a paid GENERATE to a head-stage peer and yield tokens as they arrive."""
    cfg = cfg or InferenceConfig()
    stream = await open_stream()
    try:
        await write_message(stream, {"type": "generate", "request_id": "0x" + request_id.hex(),
                                     "tx_hash": "0x" + tx_hash.hex(), "ids": prompt_ids,
                                     "max_new_tokens": max_new_tokens})
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

    from node.host import make_host, parse_peer_addr
    from node.identity import identity_from_secret

    info = parse_peer_addr(head_addr)
    host = make_host(identity_from_secret(os.urandom(31).rjust(32, b"\x01")))
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async def open_stream() -> Any:
            await host.connect(info)
            return await host.new_stream(info.peer_id, [INFER_PROTOCOL])

        yield open_stream
