"""`/pmn/state/1.0.0`: a joining replica fetches its stage's weights + optimizer state from a live peer."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from node.errors import AveragingError, NotAuthorizedError, PeerRefusedError, StateSyncError
from node.net import msgio
from node.net.access import STATE, AccessPolicy
from node.net.gate import ProtocolGate, close_quietly, reset_quietly
from node.net.host import parse_peer_addr
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.replicas.averaging import read_msg, read_msg_header, write_msg
from node.training.stagestate import install_stage_tensors, stage_tensors
from node.training.worker import StageWorker

STATE_PROTOCOL = TProtocol("/pmn/state/1.0.0")
MAX_STATE_BYTES = 1 << 32  # largest state blob accepted (a joining replica bounds it by its own stage's size)
REQUEST_LIMITS = msgio.MessageLimits(max_header_bytes=1024, max_body_bytes=0, max_depth=1, idle_timeout_s=10.0)
# a state request: one flat object {spec_hash, stage}, no blob; a peer silent for 10 s is dropped


def state_bound(worker: StageWorker) -> int:
    """Most bytes a packed state of `worker`'s stage can take: its tensors three times (weights and the two
    AdamW moments), the async schedule's stashed copies, plus 1 MiB of safetensors headers; a peer declaring more
    is refused unread."""
    n = sum(t.numel() * t.element_size() for t in worker.module.state_dict().values())
    stashed = sum(t.numel() * t.element_size() for t in worker.stash_tensors().values())
    return 3 * n + stashed + (1 << 20)


def pack_state(worker: StageWorker) -> tuple[dict[str, Any], bytes]:
    """(header, blob) of the worker's weights, AdamW state, step counter and (async schedule) the stashed weight
    copies the steps in flight compute with."""
    weights, optim, param_groups = stage_tensors(worker)
    stash = worker.stash_tensors()
    wb, ob, sb = st_save(weights), st_save(optim) if optim else b"", st_save(stash) if stash else b""
    header = {"stage": worker.spec.index, "next_step": worker.next_step, "param_groups": param_groups,
              "weights_len": len(wb), "optim_len": len(ob), "stash_len": len(sb),
              "spec_hash": worker.config.spec_hash().hex()}
    return header, wb + ob + sb


def unpack_state(worker: StageWorker, header: dict[str, Any], blob: bytes) -> int:
    """Install a packed state into `worker` (StateSyncError if it is for another model/stage); returns next_step."""
    if header.get("spec_hash") != worker.config.spec_hash().hex() or header.get("stage") != worker.spec.index:
        raise StateSyncError(f"state is for stage {header.get('stage')} of model {str(header.get('spec_hash'))[:16]}, "
                             f"this replica serves stage {worker.spec.index}")
    wl, ol, sl = int(header["weights_len"]), int(header["optim_len"]), int(header.get("stash_len", 0))
    if wl + ol + sl != len(blob):
        raise StateSyncError(f"state blob of {len(blob)} bytes, header declares {wl + ol + sl}")
    try:
        stash = st_load(blob[wl + ol:]) if sl else {}
        worker.check_stash(stash, int(header["next_step"]))  # before anything is installed
        install_stage_tensors(worker, st_load(blob[:wl]), st_load(blob[wl:wl + ol]) if ol else {},
                              header["param_groups"])
        worker.next_step = int(header["next_step"])
        worker.install_stash(stash)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StateSyncError(f"state does not fit stage {worker.spec.index}: {exc}") from exc
    return worker.next_step


class StateService:
    """Answers state requests with a snapshot taken between optimizer steps (`snapshot()`).

    A state blob is the stage's whole weights and optimizer state, so serving it is rate limited: at
    most `max_concurrent` transfers at once (each holds a snapshot in memory), and per peer a token
    bucket: `burst` transfers back to back (a replica that keeps falling behind a fast stage re-syncs
    several times in a row), then one per `refill_s`. A refused request gets an error naming the limit,
    so the asker tries another replica or retries later; refusals are counted per peer in `refused`."""

    def __init__(self, host: Any, spec_hash: str,
                 snapshot: Callable[[int], Awaitable[tuple[dict[str, Any], bytes] | None]], timeout_s: float,
                 max_concurrent: int = 2, burst: int = 8, refill_s: float = 2.0, policy: AccessPolicy | None = None,
                 guard: PeerGuardConfig | None = None, scores: PeerScores | None = None) -> None:
        self.spec_hash = spec_hash  # hex model spec hash
        self.snapshot = snapshot  # stage -> (header, blob), or None when this node does not serve that stage
        self.timeout_s = timeout_s  # bound on one exchange
        self.max_concurrent = max_concurrent  # transfers served at once
        self.burst = burst  # bucket size: transfers one peer may take back to back
        self.refill_s = refill_s  # seconds per token added back to a peer's bucket
        self.active = 0  # transfers being served now
        self.tokens: dict[str, tuple[float, float]] = {}  # peer id -> (tokens, trio time they were counted)
        self.served: dict[str, int] = {}  # peer id -> transfers served
        self.refused: dict[str, int] = {}  # peer id -> requests refused by the rate limits
        self.gate = ProtocolGate(STATE, policy, guard, scores)  # policy (same stage only), bans, stream caps
        host.set_stream_handler(STATE_PROTOCOL, self._handle)

    def admit(self, peer: str, now: float) -> str | None:
        """None when `peer` may be served now (and books the transfer), else why it may not."""
        tokens, then = self.tokens.get(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) / self.refill_s)
        self.tokens[peer] = (tokens, now)
        if self.active >= self.max_concurrent:
            reason = f"busy: already serving {self.active} state transfers (replicas.state_max_concurrent)"
        elif tokens < 1:
            reason = (f"rate limited: {self.burst} state transfers per peer, then one per {self.refill_s:g} s "
                      f"(replicas.state_burst, state_refill_s); retry in {(1 - tokens) * self.refill_s:.1f} s")
        else:
            self.active += 1
            self.tokens[peer] = (tokens - 1, now)
            self.served[peer] = self.served.get(peer, 0) + 1
            return None
        self.refused[peer] = self.refused.get(peer, 0) + 1
        return reason

    def unbook(self, peer: str) -> None:
        """Undo an admitted transfer that served nothing (the stage is not here): the peer gets its token back."""
        self.active -= 1
        tokens, then = self.tokens[peer]
        self.tokens[peer] = (min(float(self.burst), tokens + 1), then)
        self.served[peer] -= 1

    async def _handle(self, stream: Any) -> None:
        try:
            async with self.gate.serve(stream) as peer:
                await self._serve(stream, peer)
        except PeerRefusedError:
            return
        except Exception:  # a vanished peer only loses its own request
            await reset_quietly(stream)

    async def _serve(self, stream: Any, peer_id: Any) -> None:
        peer = peer_id.pretty()
        admitted = False
        try:
            with trio.fail_after(self.timeout_s):
                try:
                    req, size = await read_msg_header(stream, REQUEST_LIMITS)
                    stage = req.get("stage")
                    if size or isinstance(stage, bool) or not isinstance(stage, int):
                        raise AveragingError("a state request is {spec_hash, stage} with an integer stage and no blob")
                except AveragingError as exc:
                    self.gate.refuse(peer_id, "malformed")
                    await write_msg(stream, {"error": str(exc)})
                    await stream.close()
                    return
                try:
                    await self.gate.authorize(peer_id, stage)
                except NotAuthorizedError:
                    await write_msg(stream, {"error": "not authorized"})
                    await stream.close()
                    return
                snap = None
                refusal = None
                if req.get("spec_hash") != self.spec_hash:
                    refusal = "that model is not served here"
                else:
                    refusal = self.admit(peer, trio.current_time())
                    admitted = refusal is None
                    if admitted:
                        snap = await self.snapshot(stage)
                        if snap is None:  # a probe for a stage we do not hold costs the peer no token
                            self.unbook(peer)
                            admitted = False
                            refusal = f"stage {stage} of that model is not served here"
                if snap is None:
                    await write_msg(stream, {"error": refusal})
                else:
                    await write_msg(stream, *snap)
                await stream.close()
        except Exception:  # a vanished peer only loses its own request
            await reset_quietly(stream)
        finally:
            if admitted:
                self.active -= 1


async def fetch_state(host: Any, addr: str, worker: StageWorker, timeout_s: float) -> int:
    """Fetch `worker`'s stage state from the peer at `addr` and install it; returns the next step."""
    info = parse_peer_addr(addr)
    try:
        with trio.fail_after(timeout_s):
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [STATE_PROTOCOL])
            await write_msg(stream, {"spec_hash": worker.config.spec_hash().hex(), "stage": worker.spec.index})
            header, blob = await read_msg(stream, min(MAX_STATE_BYTES, state_bound(worker)))
            await close_quietly(stream)
    except (AveragingError, trio.TooSlowError, OSError) as exc:
        raise StateSyncError(f"could not fetch stage {worker.spec.index} state from {info.peer_id.pretty()}: "
                             f"{exc!r}") from exc
    except Exception as exc:  # libp2p dial/stream errors come as many types
        raise StateSyncError(f"could not fetch stage {worker.spec.index} state from {info.peer_id.pretty()}: "
                             f"{exc!r}") from exc
    if "error" in header:
        raise StateSyncError(f"peer {info.peer_id.pretty()} refused: {header['error']}")
    return await trio.to_thread.run_sync(lambda: unpack_state(worker, header, blob))


def describe(header: dict[str, Any]) -> str:
    """One line about a packed state (logs)."""
    return json.dumps({k: header[k] for k in ("stage", "next_step", "weights_len", "optim_len") if k in header})
