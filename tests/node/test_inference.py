"""Paid inference over real libp2p hosts: 3 stages, each on its own host on 127.0.0.1."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import trio

from node.net.host import full_addrs, parse_peer_addr
from node.services.inference import (
    INFER_PROTOCOL,
    InferenceError,
    InferenceService,
    UnpaidRequestError,
    check_request,
    generate,
    request_limits,
)
from sharding.codecs import get_codec
from sharding.config import PRESETS
from sharding.partition import partition
from sharding.stage import build_model, build_stage
from tests.node.conftest import running_host

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

CONFIG = PRESETS["tiny-subspace"]


class Ledger:
    """The payments a test chain would hold: tx hash -> request id."""

    def __init__(self) -> None:
        self.paid: dict[bytes, bytes] = {}
        self.checks = 0

    def verify(self, request_id: bytes, tx_hash: bytes) -> None:
        self.checks += 1
        if self.paid.get(tx_hash) != request_id:
            raise UnpaidRequestError(f"transaction 0x{tx_hash.hex()} did not pay for request 0x{request_id.hex()}")


def _greedy_reference(prompt: list[int], n: int) -> list[int]:
    model = build_model(CONFIG)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-CONFIG.seq_len:]]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def _opener(host: Any, addr: str) -> Any:
    info = parse_peer_addr(addr)

    async def open_stream() -> Any:
        await host.connect(info)
        return await host.new_stream(info.peer_id, [INFER_PROTOCOL])

    return open_stream


def test_three_stage_paid_generation_matches_unsplit_model() -> None:
    specs = partition(CONFIG, 3)
    codec = get_codec("subspace", CONFIG)
    ledger = Ledger()
    prompt = list(b"def main(")
    results: dict[str, Any] = {}

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            hosts = [await stack.enter_async_context(running_host(100 + i)) for i in range(4)]
            addrs = [full_addrs(h)[0] for h, _ in hosts]
            services = []
            for i, spec in enumerate(specs):
                host = hosts[i][0]
                nxt = _opener(host, addrs[i + 1]) if i + 1 < len(specs) else None
                svc = InferenceService(CONFIG, spec, build_stage(CONFIG, spec), codec, ledger, nxt)
                host.set_stream_handler(INFER_PROTOCOL, svc.handle)
                services.append(svc)
            client = hosts[3][0]
            head = _opener(client, addrs[0])

            # unpaid: refused before any compute, with the reason
            with pytest.raises(InferenceError, match="did not pay"):
                async for _ in generate(head, prompt, request_id=b"\x01" * 32, tx_hash=b"\x02" * 32, max_new_tokens=3):
                    pass
            assert services[0].tokens_served == 0

            ledger.paid[b"\x03" * 32] = b"\x04" * 32
            tokens = [t async for t in generate(head, prompt, request_id=b"\x04" * 32, tx_hash=b"\x03" * 32,
                                                max_new_tokens=12)]
            results["tokens"] = tokens
            # one payment pays for one request
            with pytest.raises(InferenceError, match="already served"):
                async for _ in generate(head, prompt, request_id=b"\x04" * 32, tx_hash=b"\x03" * 32, max_new_tokens=2):
                    pass
            results["served"] = [s.tokens_served for s in services]
            results["rejected"] = services[0].rejected

    trio.run(main)
    assert results["tokens"] == _greedy_reference(prompt, 12)
    assert results["served"] == [12, 12, 12]  # every stage took part in every token
    assert results["rejected"] == 2
    # every stage checks the payment once per request (its first hop), the head also the unpaid and replayed ones
    assert ledger.checks == 1 + 3 + 1


def test_malformed_requests_get_clear_errors() -> None:
    spec = partition(CONFIG, 1)[0]
    ledger = Ledger()
    ledger.paid[b"\x09" * 32] = b"\x08" * 32
    errors: list[str] = []

    async def main() -> None:
        async with running_host(200) as (server, _), running_host(201) as (client, _):
            svc = InferenceService(CONFIG, spec, build_stage(CONFIG, spec), get_codec("dense", CONFIG), ledger, None)
            server.set_stream_handler(INFER_PROTOCOL, svc.handle)
            head = _opener(client, full_addrs(server)[0])
            for ids, n in (([], 2), ([999], 2), (list(b"ok"), 0), (list(b"ok"), 10_000)):
                with pytest.raises(InferenceError) as info:
                    async for _ in generate(head, ids, request_id=b"\x08" * 32, tx_hash=b"\x09" * 32, max_new_tokens=n):
                        pass
                errors.append(str(info.value))
            # the node still serves a good request afterwards
            ledger.paid[b"\x0a" * 32] = b"\x0b" * 32
            out = [t async for t in generate(head, list(b"ok"), request_id=b"\x0b" * 32, tx_hash=b"\x0a" * 32,
                                             max_new_tokens=2)]
            assert len(out) == 2

    trio.run(main)
    assert "ids" in errors[0] and "ids" in errors[1]
    assert "max_new_tokens" in errors[2] and "max_new_tokens" in errors[3]


def test_limits_are_free_and_the_same_stream_then_serves_a_paid_request() -> None:
    spec = partition(CONFIG, 1)[0]
    ledger = Ledger()
    ledger.paid[b"\x0d" * 32] = b"\x0c" * 32

    async def main() -> None:
        async with running_host(202) as (server, _), running_host(203) as (client, _):
            svc = InferenceService(CONFIG, spec, build_stage(CONFIG, spec), get_codec("dense", CONFIG), ledger, None)
            server.set_stream_handler(INFER_PROTOCOL, svc.handle)
            stream = await _opener(client, full_addrs(server)[0])()
            limits = await request_limits(stream)
            assert limits == {"seq_len": CONFIG.seq_len, "vocab_size": CONFIG.vocab_size,
                              "max_new_tokens": svc.cfg.max_new_tokens}
            assert ledger.checks == 0  # nothing was asked of the chain

            async def same() -> Any:
                return stream

            out = [t async for t in generate(same, list(b"ok"), request_id=b"\x0c" * 32, tx_hash=b"\x0d" * 32,
                                             max_new_tokens=2)]
            assert len(out) == 2 and ledger.checks == 1

    trio.run(main)
    limits = {"seq_len": 4, "vocab_size": 256, "max_new_tokens": 8}
    check_request(limits, [1, 2, 3, 4], 8)
    for ids, n, words in (([1] * 5, 1, "5 tokens"), ([], 1, "0 tokens"), ([300], 1, "token id 300"),
                          ([1], 9, "max_new_tokens")):
        with pytest.raises(InferenceError, match=words):
            check_request(limits, ids, n)
