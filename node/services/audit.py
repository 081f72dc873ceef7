"""Spot checks over the network: `/pmn/audit/1.0.0`, what a node records for it, and the attester client.

A node records, through the worker's observer hook, its stage parameters before each optimizer step
(the parameters every hop of that step was computed with) and every data frame it received (token
window + codec payload), under `<data_dir>/audit/epoch<E>/`, and keeps them while the epoch may
still be challenged. It serves them on `/pmn/audit/1.0.0`. Records are kept per rollback generation
(`protocol.receipts.Receipt.generation`; replicated mode, `node.replicas.rollback`): after a rollback the
steps from the rewound-to step on run again, and the first run's records stay beside the re-run's, so a hop
is always checked against the run its receipt names.

Messages (both ways): 4-byte big-endian header length, UTF-8 JSON header, 4-byte body length, body;
both lengths are checked against `AuditConfig.max_message_bytes` before anything is read. Requests:

- `{"type": "hop", "model_id", "step", "microbatch", "direction"}` (and optionally `"rollback_gen"`,
  `"rollback_step"`: the receipt's generation, default 0, 0): the parameters at `step`
  (safetensors bytes) and the activation the node received for (step, microbatch) (at the head: the
  data window and no payload). Reply header `{"type": "hop", "stage", "state_bytes", "window_bytes"}`,
  body = state + window + payload.
- `{"type": "received", "model_id", "step", "microbatch", "direction"}`: the frame of that direction
  (0 forward = activation, 1 backward = gradient) the node received: what its neighbour sent.
  Reply `{"type": "received", "window_bytes"}`, body = window + payload.
- `{"type": "receipts", "model_id", "epoch"}`: the receipts of the epoch in the node's store: co-signed ones
  and its own uncountersigned claims (JSON list in the body).

Errors come back as `{"type": "error", "message": ...}` naming the unknown step, microbatch or field.
A node serving with its identity adds `"address"` (its node key) and `"binding"` (hex, `node.net.identity.bind`)
to every reply header; a client that asks for a given node's data (`node=`) refuses a reply whose binding
does not tie the answering peer id to that address, so data is never pinned on the wrong node key.
The attester (`Attester`) samples co-signed hops at the audit rate, fetches the sender's state and
input and the receiver's copy of what was sent, re-executes with `protocol.spotcheck`, and turns a
mismatch into `FraudEvidence` that `submit_frauds` submits with the attester quorum.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.custom_types import TProtocol
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from node.errors import BindingError, NodeError, NotAuthorizedError, PeerRefusedError
from node.net import msgio
from node.net.access import AUDIT, AccessPolicy, AuditRequest
from node.net.gate import ProtocolGate, close_quietly, reset_quietly
from node.net.identity import NodeIdentity, bind, identity_from_secret, verify_binding
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.training.worker import window_to_bytes
from node.wire import frames
from protocol.audit_sampling import AuditRule, audit_assignment, seed_from_chain
from protocol.errors import ProtocolError, SpotCheckError
from protocol.receipts import BACKWARD, FORWARD, SignedReceipt, payload_digest
from protocol.spotcheck import (
    FraudEvidence,
    HopInput,
    SpotCheckConfig,
    SpotCheckResult,
    check_hop,
    sample_hops,
)
from sharding.config import ModelConfig
from sharding.stagespec import StageSpec

AUDIT_PROTOCOL = TProtocol("/pmn/audit/1.0.0")
_LEN = struct.Struct(">I")


class AuditError(NodeError):
    """An audit request or reply is malformed, refused, or names data the node does not hold."""


UNAVAILABLE_MESSAGE = "chain unavailable"  # the refusal of a node whose chain did not answer (not the asker's fault)


def _refusal(exc: NotAuthorizedError) -> dict[str, Any]:
    """The error reply of a refused request: "not authorized", or "chain unavailable" during an RPC outage."""
    return {"type": "error", "message": "not authorized" if exc.peer_at_fault else UNAVAILABLE_MESSAGE}


@dataclass
class AuditConfig:
    """What a node keeps for spot checks and the limits of the audit protocol."""

    retain_epochs: int = 2  # most recent epochs always kept (the current one and the last settled ones)
    retain_s: float = 3600.0  # seconds an older epoch's records are kept after its last write (>= challenge window)
    max_message_bytes: int = 64 * 1024 * 1024  # largest reply header or body a client accepts, checked before reading
    request_timeout_s: float = 30.0  # longest one request may take, dial included
    unavailable_retries: int = 4  # re-asks of a node whose reply says its chain view is down (RPC outage)
    unavailable_backoff_s: float = 1.0  # wait before the first re-ask, doubled for each further one
    max_request_bytes: int = 4096  # largest request header a node reads (requests carry no body: one is refused unread)
    max_request_depth: int = 2  # deepest JSON nesting of a request header
    idle_timeout_s: float = 30.0  # a node closes an audit stream that sends nothing for this long
    guard: PeerGuardConfig = field(default_factory=PeerGuardConfig)  # refusal scores, bans and stream caps

    def request_limits(self) -> msgio.MessageLimits:
        """What a node reads of one request: a small header and no body."""
        return msgio.MessageLimits(max_header_bytes=self.max_request_bytes, max_body_bytes=0,
                                   max_depth=self.max_request_depth, idle_timeout_s=self.idle_timeout_s).validate()

    def validate(self) -> AuditConfig:
        """Raise ValueError naming a bad field."""
        if self.retain_epochs < 1:
            raise ValueError(f"AuditConfig.retain_epochs={self.retain_epochs!r}: must be >= 1")
        if self.retain_s < 0:
            raise ValueError(f"AuditConfig.retain_s={self.retain_s!r}: must be >= 0")
        if self.max_message_bytes < 1024:
            raise ValueError(f"AuditConfig.max_message_bytes={self.max_message_bytes!r}: must be >= 1024")
        if not self.request_timeout_s > 0:
            raise ValueError(f"AuditConfig.request_timeout_s={self.request_timeout_s!r}: must be > 0")
        if self.unavailable_retries < 0 or self.unavailable_backoff_s < 0:
            raise ValueError("AuditConfig.unavailable_retries and unavailable_backoff_s must be >= 0")
        return self


class _UnavailableReply(Exception):
    """A node answered "chain unavailable" (internal to AuditClient.request: it asks again)."""


class _OtherModelError(NotAuthorizedError):
    """A request names another model id (answered like any refusal: the reply never names ours)."""


# -- wire -------------------------------------------------------------------------------------------


async def write_message(stream: Any, header: dict[str, Any], body: bytes = b"") -> None:
    """Send one message (node.net.msgio framing)."""
    await msgio.write_message(stream, header, body)


async def read_message(stream: Any, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Receive one message; oversized or malformed messages raise AuditError before the part is read."""
    return await msgio.read_message(stream, max_bytes, AuditError)


def _uint(header: dict[str, Any], key: str, limit: int | None = None) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (limit is not None and value >= limit):
        bound = f" below {limit}" if limit is not None else ""
        raise AuditError(f"field '{key}' must be an integer >= 0{bound}, got {value!r}")
    return value


def _credentials(header: dict[str, Any]) -> tuple[str, bytes]:
    """(attester address, binding) a request carries ("", b"" when it carries none)."""
    attester, binding = header.get("attester", ""), header.get("attester_binding", "")
    if not isinstance(attester, str) or not isinstance(binding, str) or len(attester) > 42 or len(binding) > 140:
        raise AuditError("fields 'attester' and 'attester_binding' must be an address and a hex signature")
    try:
        return attester, bytes.fromhex(binding.removeprefix("0x"))
    except ValueError:
        raise AuditError("field 'attester_binding' is not hex") from None


# -- recording --------------------------------------------------------------------------------------


class AuditRecorder:
    """Worker observer: parameters before each optimizer step and every received data frame, on disk."""

    def __init__(self, data_dir: str | Path, epoch_length: int, config: AuditConfig | None = None,
                 clock: Callable[[], float] = time.time,
                 generation: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        if epoch_length < 1:
            raise ValueError(f"epoch_length={epoch_length!r}: must be >= 1")
        self.root = Path(data_dir).expanduser() / "audit"
        self.root.mkdir(parents=True, exist_ok=True)
        self.epoch_length = epoch_length  # optimizer steps per accounting epoch
        self.config = (config or AuditConfig()).validate()
        self.clock = clock
        self.generation = generation  # the rollback generation the node trains in now: what a record is filed under
        self._lock = threading.Lock()
        self._written: dict[int, float] = {}  # epoch -> clock time of its last record in this process

    def _dir(self, step: int) -> Path:
        return self.root / f"epoch{step // self.epoch_length}"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    @staticmethod
    def _suffix(generation: tuple[int, int]) -> str:
        """File-name suffix of a generation's records ("" for generation 0)."""
        return "" if generation == (0, 0) else f"-g{generation[0]}r{generation[1]}"

    def _state_path(self, step: int, generation: tuple[int, int]) -> Path:
        return self._dir(step) / f"state-{step}{self._suffix(generation)}.safetensors"

    def _recv_path(self, direction: int, step: int, mb: int, generation: tuple[int, int]) -> Path:
        kind = "fwd" if direction == FORWARD else "bwd"
        return self._dir(step) / f"recv-{kind}-{step}-{mb}{self._suffix(generation)}.bin"

    def on_frame(self, fr: frames.Frame) -> None:
        """Keep a received data frame's window and payload (called off the event loop)."""
        h = fr.header
        direction = FORWARD if h.kind == frames.Kind.ACTIVATION else BACKWARD
        with self._lock:
            self._write(self._recv_path(direction, h.step, h.microbatch, self.generation()),
                        _LEN.pack(len(fr.window)) + fr.window + fr.payload)
            self._written[h.step // self.epoch_length] = self.clock()

    def on_before_update(self, step: int, module: torch.nn.Module) -> None:
        """Keep the parameters every hop of `step` was computed with, then drop expired epochs."""
        # a copy in host memory (no second copy on the GPU); attesters re-execute from it on CPU
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
        with self._lock:
            self._write(self._state_path(step, self.generation()), st_save(state))
            self._written[step // self.epoch_length] = self.clock()
            self._prune(step // self.epoch_length)

    def _prune(self, current_epoch: int) -> None:
        now = self.clock()
        for d in self.root.glob("epoch*"):
            try:
                epoch = int(d.name.removeprefix("epoch"))
            except ValueError:
                continue
            written = self._written.get(epoch, d.stat().st_mtime)  # records of an earlier run: file time
            if epoch <= current_epoch - self.config.retain_epochs and now - written > self.config.retain_s:
                shutil.rmtree(d, ignore_errors=True)
                self._written.pop(epoch, None)

    def epochs(self) -> list[int]:
        """Epochs whose records are still kept."""
        return sorted(int(d.name.removeprefix("epoch")) for d in self.root.glob("epoch*") if d.is_dir())

    def state_bytes(self, step: int, generation: tuple[int, int] = (0, 0)) -> bytes:
        """Safetensors bytes of the parameters at `step` in rollback `generation` (AuditError if not kept)."""
        path = self._state_path(step, generation)
        if not path.exists():
            raise AuditError(f"no parameters kept for step {step}{_gen_text(generation)} (kept epochs: "
                             f"{self.epochs()})")
        return path.read_bytes()

    def received(self, direction: int, step: int, mb: int, generation: tuple[int, int] = (0, 0)) -> tuple[bytes, bytes]:
        """(window, payload) of the frame of `direction` received for (step, mb) in rollback `generation` (AuditError
        if not kept)."""
        path = self._recv_path(direction, step, mb, generation)
        if not path.exists():
            name = "activation" if direction == FORWARD else "gradient"
            raise AuditError(f"no {name} received for step {step} microbatch {mb}{_gen_text(generation)} is kept")
        raw = path.read_bytes()
        (wlen,) = _LEN.unpack(raw[:4])
        return raw[4:4 + wlen], raw[4 + wlen:]


def _gen_text(generation: tuple[int, int]) -> str:
    return "" if generation == (0, 0) else f" of rollback generation {generation[0]} (from step {generation[1]})"


def _generation(header: dict[str, Any]) -> tuple[int, int]:
    """The rollback generation a hop request names ((0, 0) when it names none); AuditError naming a bad field."""
    gen = _uint(header, "rollback_gen", 1 << 32) if "rollback_gen" in header else 0
    step = _uint(header, "rollback_step", 1 << 64) if "rollback_step" in header else 0
    if gen == 0 and step != 0:
        raise AuditError(f"field 'rollback_step' must be 0 in generation 0, got {step}")
    return gen, step


def _generation_fields(generation: tuple[int, int]) -> dict[str, int]:
    """The request fields naming a rollback generation (none for generation 0)."""
    return {} if generation == (0, 0) else {"rollback_gen": generation[0], "rollback_step": generation[1]}


# -- serving ----------------------------------------------------------------------------------------


class AuditService:
    """Serves `/pmn/audit/1.0.0` for one stage of one model from an `AuditRecorder`."""

    def __init__(self, recorder: AuditRecorder, worker: Any, model_id: int,
                 receipts: Callable[[int], list[SignedReceipt]] | None = None,
                 config: AuditConfig | None = None, identity: NodeIdentity | None = None,
                 policy: AccessPolicy | None = None, scores: PeerScores | None = None) -> None:
        self.recorder = recorder
        self.worker = worker  # the StageWorker (stage spec, head data window, microbatch count)
        self.model_id = model_id  # the on-chain model this node trains
        self.receipts = receipts  # epoch -> the node's co-signed receipts of it
        self.config = (config or AuditConfig()).validate()
        self.served = 0  # requests answered without error
        self.gate = ProtocolGate(AUDIT, policy, self.config.guard, scores)  # policy, bans, stream caps
        self._limits = self.config.request_limits()
        # reply-header fields proving which node key this host speaks for (none without an identity)
        self.proof: dict[str, str] = {} if identity is None else {
            "address": identity.address, "binding": "0x" + bind(identity).hex()}

    def parse(self, header: dict[str, Any]) -> AuditRequest:
        """The request a header asks for (AuditError naming a bad field; never naming our model)."""
        kind = header["type"]
        if kind not in ("hop", "received", "receipts"):
            raise AuditError(f"unknown request type {kind[:32]!r}: expected hop, received or receipts")
        if _uint(header, "model_id") != self.model_id:
            raise _OtherModelError("not authorized for this request")
        attester, binding = _credentials(header)
        if kind == "receipts":
            return AuditRequest("receipts", -1, -1, -1, _uint(header, "epoch"), attester=attester, binding=binding)
        step = _uint(header, "step")
        mb = _uint(header, "microbatch", self.worker.num_microbatches)
        direction = _uint(header, "direction", 2)
        _generation(header)
        mine = self.worker.spec.index
        # the hop's key names its sender's stage: ours for "hop", the neighbour that sent what we received otherwise
        stage = mine if kind == "hop" else mine - 1 if direction == FORWARD else mine + 1
        return AuditRequest(kind, step, mb, direction, step // self.recorder.epoch_length, stage=stage,
                            attester=attester, binding=binding)

    def _answer(self, header: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        kind = header["type"]
        if kind == "receipts":
            epoch = _uint(header, "epoch")
            if self.receipts is None:
                raise AuditError("this node keeps no receipts")
            body = json.dumps([s.to_json() for s in self.receipts(epoch)]).encode()
            return {"type": "receipts", "epoch": epoch}, body
        if kind not in ("hop", "received"):
            raise AuditError(f"unknown request type {kind!r}: expected hop, received or receipts")
        step = _uint(header, "step")
        mb = _uint(header, "microbatch", self.worker.num_microbatches)
        direction = _uint(header, "direction", 2)
        generation = _generation(header)
        if kind == "received":
            window, payload = self.recorder.received(direction, step, mb, generation)
            return {"type": "received", "window_bytes": len(window)}, window + payload
        state = self.recorder.state_bytes(step, generation)
        if self.worker.spec.is_first:
            window = window_to_bytes(self.worker.head_window(step, mb), self.worker.id_bytes)
            payload = b""
        else:
            window, payload = self.recorder.received(FORWARD, step, mb, generation)
        return ({"type": "hop", "stage": self.worker.spec.index, "state_bytes": len(state),
                 "window_bytes": len(window)}, state + window + payload)

    async def handle(self, stream: Any) -> None:
        """Answer requests on one stream until the client closes it.

        The peer is admitted (bans, stream caps) and authorized for this stage before a byte is read;
        each request header (small, no body) is then checked by the policy before anything is served:
        the stage's weights leave the node only for the step of a request the policy allows."""
        try:
            async with self.gate.serve(stream) as peer:
                await self._serve(stream, peer)
        except PeerRefusedError:
            return
        except Exception:  # a reset stream: nothing to answer
            await reset_quietly(stream)
            return
        await close_quietly(stream)

    async def _serve(self, stream: Any, peer: Any) -> None:
        try:
            await self.gate.authorize(peer, self.worker.spec.index)
        except NotAuthorizedError as exc:
            await write_message(stream, _refusal(exc))
            return
        while True:
            try:
                header, _ = await msgio.read_header(stream, self._limits, AuditError)
            except AuditError as exc:
                if not msgio.is_clean_end(exc):  # anything but a clean end: counted
                    self.gate.refuse(peer, "malformed")
                    await write_message(stream, {"type": "error", "message": str(exc)})
                return
            try:
                try:
                    request = self.parse(header)
                except AuditError:
                    self.gate.refuse(peer, "bad_request")
                    raise
                await self.gate.authorize_audit(peer, request)
                reply, body = await trio.to_thread.run_sync(self._answer, header)
            except NotAuthorizedError as exc:
                if isinstance(exc, _OtherModelError):
                    self.gate.refuse(peer, "not_authorized")
                await write_message(stream, _refusal(exc))
                return
            except AuditError as exc:  # a malformed request (counted above) or data this node does not keep
                await write_message(stream, {"type": "error", "message": str(exc), **self.proof})
                continue
            await write_message(stream, {**reply, **self.proof}, body)
            self.served += 1


def install_audit(host: Any, worker: Any, identity: NodeIdentity, data_dir: Path, model_id: int, epoch_length: int,
                  receipts: Callable[[int], list[SignedReceipt]] | None = None,
                  config: AuditConfig | None = None, policy: AccessPolicy | None = None,
                  scores: PeerScores | None = None,
                  generation: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> AuditService:
    """Attach a recorder to `worker` (records under `data_dir`, filed under the rollback `generation` the node trains
    in when each is made) and serve `/pmn/audit/1.0.0` on `host` (`policy`: who may audit which hops, default
    OpenPolicy; `scores`: the node's refusal scores, default its own)."""
    recorder = AuditRecorder(data_dir, epoch_length, config, generation=generation)
    worker.observers.append(recorder)
    service = AuditService(recorder, worker, model_id, receipts, config, identity=identity, policy=policy,
                           scores=scores)
    host.set_stream_handler(AUDIT_PROTOCOL, service.handle)
    return service


# -- client -----------------------------------------------------------------------------------------


def check_node_proof(addr: str, reply: dict[str, Any], node: str, peer_id: Any) -> None:
    """AuditError unless `reply` names `node` and carries its node key's binding of `peer_id` (who answered)."""
    claimed = str(reply.get("address") or "")
    if not claimed:
        raise AuditError(f"{addr}: the reply does not say which node key it speaks for (expected node {node})")
    if claimed.lower() != node.lower():
        raise AuditError(f"{addr} speaks for node {claimed}, not for node {node}")
    try:
        verify_binding(claimed, peer_id, bytes.fromhex(str(reply.get("binding", "")).removeprefix("0x")))
    except (BindingError, ValueError) as exc:
        raise AuditError(f"{addr} does not prove it speaks for node {node}: {exc}") from exc


class AuditClient:
    """Requests to nodes' audit protocol from one client host (any trio task)."""

    def __init__(self, host: Any, model_id: int, config: AuditConfig | None = None,
                 credentials: dict[str, str] | None = None) -> None:
        self.host = host
        self.model_id = model_id
        self.config = (config or AuditConfig()).validate()
        # {"attester", "attester_binding"} sent with every request (attester_credentials); {} for none
        self.credentials = dict(credentials or {})

    async def request(self, addr: str, header: dict[str, Any], node: str | None = None
                      ) -> tuple[dict[str, Any], bytes]:
        """One request/reply to the node at full multiaddr `addr`; error replies raise AuditError.

        With `node` (an address), the reply must prove that the answering peer id is bound to that node key.
        A node whose chain view is down ("chain unavailable": an RPC outage, not its fault) is asked again up to
        `unavailable_retries` times with a doubling backoff; after that its refusal is an AuditError like any other.
        """
        for attempt in range(self.config.unavailable_retries + 1):
            try:
                return await self._request_once(addr, header, node)
            except _UnavailableReply:
                if attempt == self.config.unavailable_retries:
                    raise AuditError(f"{addr}: {UNAVAILABLE_MESSAGE} after {attempt + 1} attempt(s)") from None
                await trio.sleep(self.config.unavailable_backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request_once(self, addr: str, header: dict[str, Any], node: str | None) -> tuple[dict[str, Any], bytes]:
        from node.net.host import parse_peer_addr

        info = parse_peer_addr(addr)
        with trio.fail_after(self.config.request_timeout_s):
            await self.host.connect(info)
            stream = await self.host.new_stream(info.peer_id, [AUDIT_PROTOCOL])
            try:
                await write_message(stream, {**header, **self.credentials, "model_id": self.model_id})
                reply, body = await read_message(stream, self.config.max_message_bytes)
            finally:
                await stream.close()
        if reply["type"] == "error" and reply.get("message") == UNAVAILABLE_MESSAGE:
            raise _UnavailableReply()
        if node is not None:
            check_node_proof(addr, reply, node, stream.muxed_conn.peer_id)
        if reply["type"] == "error":
            raise AuditError(f"{addr}: {reply.get('message')}")
        if reply["type"] != header["type"]:
            raise AuditError(f"{addr}: expected a {header['type']!r} reply, got {reply['type']!r}")
        return reply, body

    async def hop(self, addr: str, step: int, mb: int, direction: int, node: str | None = None,
                  generation: tuple[int, int] = (0, 0)) -> tuple[dict[str, torch.Tensor], bytes, bytes]:
        """(state_dict, window, input payload) of a hop the node at `addr` (node key `node`, if given) sent in rollback
        `generation`."""
        reply, body = await self.request(addr, {"type": "hop", "step": step, "microbatch": mb, "direction": direction,
                                                **_generation_fields(generation)}, node)
        n, w = int(reply["state_bytes"]), int(reply["window_bytes"])
        if n + w > len(body):
            raise AuditError(f"{addr}: hop reply declares {n + w} bytes of state and window, body has {len(body)}")
        try:
            state = st_load(body[:n])
        except Exception as exc:  # safetensors raises its own error types
            raise AuditError(f"{addr}: the parameters of step {step} do not parse: {exc}") from exc
        return state, body[n:n + w], body[n + w:]

    async def received(self, addr: str, step: int, mb: int, direction: int, node: str | None = None,
                       generation: tuple[int, int] = (0, 0)) -> tuple[bytes, bytes]:
        """(window, payload) of the frame the node at `addr` (node key `node`, if given) received for (step, mb,
        direction) in rollback `generation`."""
        reply, body = await self.request(addr, {"type": "received", "step": step, "microbatch": mb,
                                                "direction": direction, **_generation_fields(generation)}, node)
        w = int(reply["window_bytes"])
        if w > len(body):
            raise AuditError(f"{addr}: received reply declares {w} window bytes, body has {len(body)}")
        return body[:w], body[w:]

    async def receipts(self, addr: str, epoch: int) -> list[SignedReceipt]:
        """The co-signed receipts of `epoch` that the node at `addr` keeps (malformed ones raise)."""
        _, body = await self.request(addr, {"type": "receipts", "epoch": epoch})
        try:
            return [SignedReceipt.from_json(r) for r in json.loads(body)]
        except (ProtocolError, ValueError, TypeError) as exc:
            raise AuditError(f"{addr}: malformed receipts of epoch {epoch}: {exc}") from exc


# -- attester ---------------------------------------------------------------------------------------


@dataclass
class AuditReport:
    """What one attester found in one epoch."""

    checked: int = 0  # hops re-executed
    failed: int = 0  # hops whose check failed (recomputation mismatch or unservable data)
    results: list[SpotCheckResult] = field(default_factory=list)  # passed and failed re-executions
    evidence: list[FraudEvidence] = field(default_factory=list)  # one per failed hop
    errors: list[str] = field(default_factory=list)  # why a hop could not be checked

    def to_json(self) -> dict[str, int]:
        """The counts the demo reports."""
        return {"checked": self.checked, "failed": self.failed}


def hop_id(signed: SignedReceipt) -> tuple[int, ...]:
    """A hop's replay key and its rollback generation: after a rollback one key may have a receipt per generation."""
    return (*signed.receipt.key, *signed.receipt.generation)


def checkable(signed: SignedReceipt, num_stages: int) -> bool:
    """Hops a spot check can re-execute: forward hops of non-tail stages and the tail's backward hop."""
    r = signed.receipt
    return (r.direction == FORWARD and r.stage < num_stages - 1) or (r.direction == BACKWARD and r.stage == num_stages - 1)


@dataclass(frozen=True)
class AttesterRole:
    """An attester under the published sampling rule (on-chain mode): who it is and what it may ask for."""

    account: Any  # the validator's eth-account signer (its key also derives the attester host's peer key)
    seed: bytes  # the epoch's hop seed (protocol.audit_sampling.seed_from_chain: the epoch's live root)
    attesters: tuple[str, ...]  # the attester set (ValidatorQuorum.validators())
    audit_rate_bps: int  # the model's audit rate (terms)
    rule: AuditRule = field(default_factory=AuditRule)  # the published rule's parameters

    @property
    def address(self) -> str:
        """The attester's address."""
        return str(self.account.address)

    def identity(self) -> NodeIdentity:
        """The attester host's identity: the validator key, with a peer key derived from it."""
        return identity_from_secret(bytes(self.account.key))


def attester_role(client: Any, account: Any, model_id: int, epoch: int, rule: AuditRule | None = None) -> AttesterRole:
    """The role of validator `account` for `epoch` of the model, read from chain (`client`: the contracts
    client). AuditSamplingError while the epoch has no live root."""
    seed = seed_from_chain(client, model_id, epoch)
    return AttesterRole(account, seed, tuple(client.validators()), int(client.get_model(model_id).terms.audit_rate_bps),
                        rule or AuditRule())


def attester_credentials(identity: NodeIdentity) -> dict[str, str]:
    """The request fields proving that the attester host's peer id speaks for `identity`'s address."""
    return {"attester": identity.address, "attester_binding": "0x" + bind(identity).hex()}


class Attester:
    """Samples co-signed hops, fetches what re-execution needs over libp2p, and checks them.

    Each fetch names the node key of the receipt (sender or receiver): a reply without that node key's
    binding of the answering peer id fails the check like data the node cannot serve.
    """

    def __init__(self, client: AuditClient, model: ModelConfig, specs: Sequence[StageSpec], codec: str,
                 num_microbatches: int, peers: dict[str, str], check: SpotCheckConfig,
                 role: AttesterRole | None = None) -> None:
        self.client = client
        # on-chain mode: audit only the hops the published rule assigns this attester (None: sample at check's rate)
        self.role = role
        self.model = model  # the model's architecture
        self.specs = list(specs)  # its stages
        self.codec = codec  # boundary codec name
        self.num_microbatches = num_microbatches  # the tail scales its loss by 1 / this before backward
        self.peers = peers  # node address -> full multiaddr of its audit service
        self.check = check.validate()

    def _addr(self, node: str) -> str:
        for address, addr in self.peers.items():
            if address.lower() == node.lower():
                return addr
        raise AuditError(f"no address known for node {node}")

    async def check_receipt(self, signed: SignedReceipt, upstream: SignedReceipt | None) -> SpotCheckResult:
        """Fetch and re-execute one hop; `upstream` is the co-signed receipt of the activation the sender received."""
        r = signed.receipt
        state, in_window, in_payload = await self.client.hop(self._addr(r.sender), r.step, r.microbatch, r.direction,
                                                             node=r.sender, generation=r.generation)
        spec = self.specs[r.stage]
        if not spec.is_first:
            if upstream is None:
                raise SpotCheckError("input_payload", f"no co-signed receipt of the activation stage {r.stage} received")
            if payload_digest(in_payload, in_window) != upstream.receipt.payload_digest:
                raise SpotCheckError("input_payload", "the input the node served is not the one it countersigned")
        sent_window, sent = await self.client.received(self._addr(r.receiver), r.step, r.microbatch, r.direction,
                                                       node=r.receiver, generation=r.generation)
        window_raw = sent_window if r.direction == FORWARD else in_window
        window = _window_tensor(window_raw, self.model, len(in_window))
        hop = HopInput(signed, sent, window, state, None if spec.is_first else in_payload)
        return await trio.to_thread.run_sync(
            lambda: check_hop(self.model, spec, self.codec, hop, self.check, grad_scale=1.0 / self.num_microbatches))

    async def audit(self, receipts: Sequence[SignedReceipt], exclude: Callable[[SignedReceipt], bool] | None = None
                    ) -> AuditReport:
        """Spot-check the epoch's co-signed `receipts` at the audit rate (one hop at a time). A hop key sampled is
        checked in every rollback generation it has a receipt of, each against that generation's records and
        upstream receipt."""
        unique = {hop_id(s): s for s in receipts if s.cosigned}
        n = len(self.specs)
        ordered = [unique[k] for k in sorted(unique)]
        sampled = [s for s in sample_hops(ordered, self.check) if checkable(s, n)] \
            if self.role is None else self.assigned(ordered)
        report = AuditReport()
        for signed in sampled:
            if exclude is not None and exclude(signed):
                continue
            r = signed.receipt
            upstream = unique.get((r.model_id, r.epoch, r.step, r.microbatch, r.stage - 1, FORWARD, *r.generation))
            report.checked += 1
            try:
                result = await self.check_receipt(signed, upstream)
            except (AuditError, SpotCheckError, trio.TooSlowError) as exc:
                # a node that cannot serve what it signed for, or serves something else, fails its check
                report.failed += 1
                report.errors.append(f"{r.sender} step {r.step} mb {r.microbatch} stage {r.stage}: {exc}")
                report.evidence.append(FraudEvidence(signed, b"\x00" * 32, float("inf"), self.check.tolerance))
                continue
            report.results.append(result)
            if not result.passed:
                report.failed += 1
                report.evidence.append(FraudEvidence(signed, result.recomputed_digest, result.relative_error,
                                                     self.check.tolerance))
        return report


    def assigned(self, receipts: Sequence[SignedReceipt]) -> list[SignedReceipt]:
        """The receipts of hops the published rule lets this attester request (`audit_assignment`), per epoch."""
        role = self.role
        assert role is not None
        by_epoch: dict[tuple[int, int], list[SignedReceipt]] = {}
        for s in receipts:
            by_epoch.setdefault((s.receipt.model_id, s.receipt.epoch), []).append(s)
        chosen: list[SignedReceipt] = []
        for (model_id, epoch), group in sorted(by_epoch.items()):
            keys = set(audit_assignment(role.seed, role.address, model_id, epoch, len(self.specs), role.attesters,
                                        group, role.audit_rate_bps, role.rule).hops)
            chosen += [s for s in group if s.receipt.key in keys]
        return chosen


def _window_tensor(raw: bytes, model: ModelConfig, expect: int) -> torch.Tensor:
    import numpy as np

    from sharding.codecs import token_id_bytes

    if expect and len(raw) != expect:
        raise SpotCheckError("window", f"{len(raw)} bytes, the sender's input window has {expect}")
    dt = np.dtype("<u2") if token_id_bytes(model) == 2 else np.dtype("<u4")
    row = (model.seq_len + 1) * dt.itemsize
    if not raw or len(raw) % row:
        raise SpotCheckError("window", f"{len(raw)} bytes is not a whole number of ({model.seq_len + 1})-token rows")
    return torch.from_numpy(np.frombuffer(raw, dtype=dt).astype(np.int64).reshape(-1, model.seq_len + 1))


def submit_frauds(client: Any, submitter: Any, attesters: Sequence[Any], evidence: Sequence[FraudEvidence]) -> list[str]:
    """Submit one fraud verdict per accused node and epoch (quorum-signed); returns the slashed nodes."""
    from protocol.settlement import attest_fraud, submit_fraud

    done: set[tuple[str, int]] = set()
    slashed: list[str] = []
    for ev in evidence:
        key = (ev.node, ev.receipt.receipt.epoch)
        if key in done or client.is_leaf_voided(ev.receipt.receipt.model_id, key[1], ev.node):
            continue
        domain = _ledger_domain(client)
        submit_fraud(client, submitter, ev, attest_fraud(domain, ev, attesters))
        done.add(key)
        slashed.append(ev.node)
    return slashed


def _ledger_domain(client: Any) -> Any:
    from protocol.settlement import ledger_domain

    return ledger_domain(client)


async def gather_receipts(client: AuditClient, addrs: Sequence[str], epoch: int) -> list[SignedReceipt]:
    """An attester collects an epoch's receipts from every node over the audit protocol.

    One receipt per hop key and rollback generation (`hop_id`), a co-signed copy preferred; uncountersigned claims
    are kept so that `protocol.epoch.build_epoch` can refuse them.
    """
    seen: dict[tuple[int, ...], SignedReceipt] = {}
    for addr in addrs:
        for s in await client.receipts(addr, epoch):
            old = seen.get(hop_id(s))
            if old is None or (s.cosigned and not old.cosigned):
                seen[hop_id(s)] = s
    return list(seen.values())


@dataclass
class AttesterHost:
    """A throwaway libp2p client host for attesters (127.0.0.1, random key)."""

    listen: str = "/ip4/127.0.0.1/tcp/0"  # where the client host listens (it only dials out)


async def run_with_client_host(fn: Callable[[Any], Any], cfg: AttesterHost | None = None,
                               identity: NodeIdentity | None = None) -> Any:
    """Run `await fn(host)` with a client host (a fresh random identity unless `identity`), closed afterwards."""
    import multiaddr

    from node.net.host import make_host
    from node.net.running import run_host

    cfg = cfg or AttesterHost()
    host = make_host(identity or identity_from_secret(os.urandom(31).rjust(32, b"\x01")))
    async with run_host(host, [multiaddr.Multiaddr(cfg.listen)]):
        return await fn(host)


def fetch_epoch_receipts(model_id: int, addrs: Sequence[str], epoch: int,
                         config: AuditConfig | None = None, account: Any = None) -> list[SignedReceipt]:
    """Blocking `gather_receipts` from a throwaway client host (speaking for validator `account`, if given:
    on-chain nodes serve receipts only to attesters)."""
    identity = None if account is None else identity_from_secret(bytes(account.key))
    credentials = None if identity is None else attester_credentials(identity)

    async def go(host: Any) -> list[SignedReceipt]:
        return await gather_receipts(AuditClient(host, model_id, config, credentials), addrs, epoch)

    result: list[SignedReceipt] = trio.run(run_with_client_host, go, None, identity)
    return result


def spot_check(model_id: int, peers: dict[str, str], receipts: Sequence[SignedReceipt], model: ModelConfig,
               specs: Sequence[StageSpec], codec: str, num_microbatches: int, check: SpotCheckConfig,
               config: AuditConfig | None = None, role: AttesterRole | None = None) -> AuditReport:
    """Blocking `Attester.audit` of one epoch's receipts from a throwaway client host; with `role` (on-chain
    mode) the host speaks for the attester and audits only the hops the published rule assigns it."""
    identity = None if role is None else role.identity()
    credentials = None if identity is None else attester_credentials(identity)

    async def go(host: Any) -> AuditReport:
        attester = Attester(AuditClient(host, model_id, config, credentials), model, specs, codec, num_microbatches,
                            peers, check, role)
        return await attester.audit(receipts)

    report: AuditReport = trio.run(run_with_client_host, go, None, identity)
    return report
