"""`/pmn/spec/1.0.0`: a node hands out the spec of the model it trains, so a newcomer who only knows the
model's on-chain spec hash can fetch the spec from the model's peers and check it against the hash.

Request: one JSON message `{"spec_hash": "0x..."}`. Answer: a header + body message, `{"type": "spec"}`
with the canonical spec bytes (`protocol.modelspec.canonical_spec`: sorted JSON of the proposal's
`model` and `training` sections), or `{"type": "unknown"}` when the node trains another model. The
fetcher recomputes keccak256 of the body and refuses it unless it equals the asked hash: a peer cannot
hand out another spec than the one the chain registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import trio
from eth_utils import keccak
from libp2p.custom_types import TProtocol

from node.errors import NodeError
from node.net import msgio

SPEC_PROTOCOL = TProtocol("/pmn/spec/1.0.0")


class SpecExchangeError(NodeError):
    """A spec could not be fetched (no peer answered, the peer does not have it, malformed answer)."""


class SpecHashError(SpecExchangeError):
    """A peer answered with bytes whose keccak256 is not the asked spec hash."""


@dataclass(frozen=True)
class SpecExchangeConfig:
    """Limits and timeouts of `/pmn/spec/1.0.0`."""

    max_spec_bytes: int = 64 * 1024  # longest spec accepted (canonical specs are a few hundred bytes)
    request_timeout_s: float = 15.0  # time allowed for one fetch: connect, ask, read the answer
    idle_timeout_s: float = 10.0  # a serving stream silent this long is dropped

    def limits(self) -> msgio.MessageLimits:
        """The message limits of both sides."""
        return msgio.MessageLimits(max_header_bytes=1024, max_body_bytes=self.max_spec_bytes, max_depth=4,
                                   idle_timeout_s=self.idle_timeout_s).validate()


class SpecService:
    """Serves `canonical` (this node's spec bytes) to whoever asks for its hash."""

    def __init__(self, canonical: bytes, cfg: SpecExchangeConfig | None = None) -> None:
        self.canonical = canonical
        self.spec_hash = bytes(keccak(canonical))
        self.cfg = cfg or SpecExchangeConfig()
        self.served = 0  # answers with the spec
        self.refused = 0  # malformed requests and requests for another model

    def install(self, host: Any) -> SpecService:
        host.set_stream_handler(SPEC_PROTOCOL, self.handle)
        return self

    async def handle(self, stream: Any) -> None:
        try:
            req = await msgio.read_json(stream, self.cfg.limits(), SpecExchangeError, "spec request")
            asked = req.get("spec_hash") if isinstance(req, dict) else None
            if asked != "0x" + self.spec_hash.hex():
                self.refused += 1
                await msgio.write_message(stream, {"type": "unknown"})
            else:
                self.served += 1
                await msgio.write_message(stream, {"type": "spec"}, self.canonical)
        except (SpecExchangeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.refused += 1
        except Exception as exc:  # a stream reset by the peer: nothing to answer
            if not type(exc).__name__.startswith("Stream"):
                raise
        finally:
            await stream.close()


def check_spec(body: bytes, spec_hash: bytes) -> dict[str, Any]:
    """The spec `{"model": {...}, "training": {...}}` in `body`; SpecHashError unless keccak256(body) == spec_hash."""
    got = bytes(keccak(body))
    if got != bytes(spec_hash):
        raise SpecHashError(f"the spec a peer sent hashes to 0x{got.hex()}, not the registered 0x{bytes(spec_hash).hex()}:"
                            " refused")
    try:
        spec = json.loads(body)
    except ValueError as exc:
        raise SpecExchangeError(f"the spec is not JSON: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict) or not isinstance(spec.get("training"), dict):
        raise SpecExchangeError("the spec must be an object with 'model' and 'training' objects")
    return spec


async def fetch_spec(open_stream: Any, spec_hash: bytes, cfg: SpecExchangeConfig | None = None) -> dict[str, Any]:
    """Ask one peer (`open_stream()` opens a `/pmn/spec/1.0.0` stream to it) for the spec with `spec_hash`."""
    cfg = cfg or SpecExchangeConfig()
    try:
        with trio.fail_after(cfg.request_timeout_s):
            stream = await open_stream()
            try:
                await msgio.write_json(stream, {"spec_hash": "0x" + bytes(spec_hash).hex()})
                header, body = await msgio.read_message(stream, cfg.limits(), SpecExchangeError)
            finally:
                await stream.close()
    except trio.TooSlowError:
        raise SpecExchangeError(f"no spec answer within {cfg.request_timeout_s} s") from None
    if header.get("type") != "spec":
        raise SpecExchangeError(f"the peer does not train the model with spec hash 0x{bytes(spec_hash).hex()[:16]}…")
    return check_spec(body, spec_hash)


async def fetch_spec_from(addrs: list[str], spec_hash: bytes, cfg: SpecExchangeConfig | None = None
                          ) -> tuple[dict[str, Any], str]:
    """(spec, the peer address that gave it): asks each full multiaddr in turn from a throwaway client host.

    A peer answering with a spec of another hash raises SpecHashError at once (a lying peer is not retried
    around: the operator should know); peers that are down or train another model are skipped."""
    import os

    import multiaddr

    from node.net.host import make_host, parse_peer_addr
    from node.net.identity import identity_from_secret
    from node.net.running import run_host

    if not addrs:
        raise SpecExchangeError("no peer address to fetch the spec from: pass --bootstrap with a peer of that model")
    host = make_host(identity_from_secret(os.urandom(31).rjust(32, b"\x01")))
    errors: list[str] = []
    found: tuple[dict[str, Any], str] | None = None
    lie: SpecHashError | None = None  # raised outside the host's nurseries, unwrapped
    async with run_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        for addr in addrs:
            info = parse_peer_addr(addr)

            async def open_stream(info: Any = info) -> Any:
                await host.connect(info)
                return await host.new_stream(info.peer_id, [SPEC_PROTOCOL])

            try:
                found = await fetch_spec(open_stream, spec_hash, cfg), addr
                break
            except SpecHashError as exc:
                lie = exc
                break
            except (SpecExchangeError, OSError) as exc:
                errors.append(f"{addr}: {exc}")
            except Exception as exc:  # libp2p's dial and negotiation errors
                errors.append(f"{addr}: {type(exc).__name__}: {exc}")
    if lie is not None:
        raise lie
    if found is not None:
        return found
    raise SpecExchangeError("no peer gave the spec: " + "; ".join(errors))


def serve_own_spec(ctx: Any) -> SpecService:
    """Serve the spec this node runs (its model config and training settings) on `ctx.host`."""
    from node.services.chain_link import training_section
    from protocol.modelspec import canonical_spec

    data = None if getattr(ctx, "data", None) is None else ctx.data.hashed()  # the spec's [data] section, if any
    return SpecService(canonical_spec(ctx.model, training_section(ctx.cfg, ctx.optim).to_dict(), data)).install(ctx.host)
