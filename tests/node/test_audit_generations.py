"""Spot checks across a rollback: receipts name the rollback generation they were signed in, nodes keep their audit
records per generation, and an attester checks every receipt against the records of its own generation.

After a rollback on chain the steps from the rewound-to step on run again, and the re-run need not reproduce the first
run's weights (async schedule, replica averaging). Two real audit services (head and tail) answer an attester over
libp2p (Noise, yamux): one hop key has a receipt of generation 0 and one of generation 1, computed with different
weights, and both must pass. A recorder that files both runs under one name (as before receipts carried the generation)
makes the first run's receipt fail: an honest node caught by its own re-run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import multiaddr
import pytest
import torch
import trio
from libp2p.custom_types import TProtocol

from node.net.host import full_addrs, make_host
from node.net.identity import NodeIdentity, identity_from_secret
from node.net.running import run_host
from node.services.audit import (
    AUDIT_PROTOCOL,
    Attester,
    AuditClient,
    AuditRecorder,
    AuditReport,
    AuditService,
    hop_id,
)
from node.training.worker import StageWorker, window_to_bytes
from node.wire import frames
from protocol.errors import ReceiptError
from protocol.receipts import (
    FORWARD,
    Domain,
    Receipt,
    SignedReceipt,
    countersign,
    payload_digest,
    sign_receipt,
)
from protocol.spotcheck import SpotCheckConfig
from sharding import PRESETS, OptimConfig, load_corpus
from sharding.partition import partition

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

MODEL, CODEC, MODEL_ID, MB_SIZE = "tiny", "dense", 7, 2
DOMAIN = Domain(1337, "0x" + "5A" * 20)
GEN0, GEN1 = (0, 0), (1, 0)  # the first run, and the run after a rollback to step 0


class _OneRunRecorder(AuditRecorder):
    """Records as before receipts named the generation: one file per step and frame, whichever run wrote it last."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, epoch_length=4)

    def state_bytes(self, step: int, generation: tuple[int, int] = GEN0) -> bytes:
        return super().state_bytes(step)

    def received(self, direction: int, step: int, mb: int, generation: tuple[int, int] = GEN0) -> tuple[bytes, bytes]:
        return super().received(direction, step, mb)


def _workers() -> tuple[StageWorker, StageWorker]:
    model = PRESETS[MODEL]
    specs = partition(model, 2)
    kw = dict(codec=CODEC, optim=OptimConfig(), num_microbatches=1, microbatch_size=MB_SIZE)
    torch.manual_seed(0)
    return (StageWorker(model, specs[0], corpus=load_corpus("synthetic"), **kw),  # type: ignore[arg-type]
            StageWorker(model, specs[1], **kw))  # type: ignore[arg-type]


def _hop(head: StageWorker, head_rec: AuditRecorder, tail_rec: AuditRecorder, sender: NodeIdentity,
         receiver: NodeIdentity, generation: tuple[int, int]) -> SignedReceipt:
    """Step 0, microbatch 0 through the head as the node runs it: the head keeps the parameters it ran with, the tail
    the frame it received, and both sign the hop's receipt in `generation`."""
    window = head.head_window(0, 0)
    payload = head.forward_eval(window, None)
    assert isinstance(payload, bytes)
    wbytes = window_to_bytes(window, head.id_bytes)
    digest = payload_digest(payload, wbytes)
    header = frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=head.config.spec_hash(), stage=0, step=0,
                                microbatch=0, digest=digest)
    head_rec.on_before_update(0, head.module)
    tail_rec.on_frame(frames.Frame(header=header, window=wbytes, payload=payload))
    receipt = Receipt(model_id=MODEL_ID, epoch=0, step=0, microbatch=0, stage=0, direction=FORWARD,
                      sender=sender.address, receiver=receiver.address, payload_digest=digest,
                      tokens=MB_SIZE * head.config.seq_len, rollback_gen=generation[0], rollback_step=generation[1])
    return countersign(sign_receipt(receipt, DOMAIN, sender.account), receiver.account)


def _audit(tmp_path: Path, per_generation: bool) -> tuple[AuditReport, list[SignedReceipt], tuple[bytes, bytes]]:
    """Run the hop in generation 0, roll back, run it again with other weights in generation 1, and audit both
    receipts (`per_generation`: the recorders file records under the generation, as nodes do)."""
    head, tail = _workers()
    head_id, tail_id = identity_from_secret(b"\x11" * 32), identity_from_secret(b"\x12" * 32)
    gen = [GEN0]
    head_rec, tail_rec = (AuditRecorder(tmp_path / name, epoch_length=4, generation=lambda: gen[0])
                          if per_generation else _OneRunRecorder(tmp_path / name) for name in ("head", "tail"))
    first = _hop(head, head_rec, tail_rec, head_id, tail_id, GEN0)
    gen[0] = GEN1  # a rollback to step 0: the re-run's weights at step 0 differ from the first run's
    with torch.no_grad():
        for p in head.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rerun = _hop(head, head_rec, tail_rec, head_id, tail_id, GEN1)
    services = [AuditService(head_rec, head, MODEL_ID, identity=head_id),
                AuditService(tail_rec, tail, MODEL_ID, identity=tail_id)]
    served: dict[str, bytes] = {}

    async def main() -> AuditReport:
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        head_host, tail_host = make_host(head_id), make_host(tail_id)
        client_host = make_host(identity_from_secret(b"\x13" * 32))
        async with run_host(head_host, listen), run_host(tail_host, listen), run_host(client_host, listen):
            head_host.set_stream_handler(TProtocol(AUDIT_PROTOCOL), services[0].handle)
            tail_host.set_stream_handler(TProtocol(AUDIT_PROTOCOL), services[1].handle)
            peers = {head_id.address: full_addrs(head_host)[0], tail_id.address: full_addrs(tail_host)[0]}
            client = AuditClient(client_host, MODEL_ID)
            for g in (GEN0, GEN1) if per_generation else ():
                _, served[f"{g}"] = await client.received(peers[tail_id.address], 0, 0, FORWARD, generation=g)
            attester = Attester(client, head.config, [head.spec, tail.spec], CODEC, 1, peers,
                                SpotCheckConfig(audit_rate=1.0))
            return await attester.audit([first, rerun])

    report = trio.run(main)
    return report, [first, rerun], (served.get(f"{GEN0}", b""), served.get(f"{GEN1}", b""))


def test_each_generations_receipt_is_checked_against_its_own_records(tmp_path: Path) -> None:
    report, (first, rerun), (payload0, payload1) = _audit(tmp_path, per_generation=True)
    assert first.receipt.key == rerun.receipt.key and hop_id(first) != hop_id(rerun)
    assert first.receipt.payload_digest != rerun.receipt.payload_digest  # the re-run computed something else
    assert payload0 != payload1  # the tail serves each generation's frame
    assert (report.checked, report.failed, report.errors) == (2, 0, []), report.errors
    assert all(r.passed for r in report.results) and len(report.results) == 2


def test_records_without_the_generation_fail_the_first_runs_honest_receipt(tmp_path: Path) -> None:
    report, (first, _), _ = _audit(tmp_path, per_generation=False)
    assert (report.checked, report.failed) == (2, 1), report.errors
    assert [ev.receipt for ev in report.evidence] == [first]  # the re-run overwrote what the first run's receipt needs


def test_the_generation_is_signed_and_checked() -> None:
    head_id, tail_id = identity_from_secret(b"\x11" * 32), identity_from_secret(b"\x12" * 32)
    receipt = Receipt(MODEL_ID, 0, 3, 0, 0, FORWARD, head_id.address, tail_id.address, payload_digest(b"x"), 8,
                      rollback_gen=2, rollback_step=1)
    signed = countersign(sign_receipt(receipt, DOMAIN, head_id.account), tail_id.account)
    assert SignedReceipt.from_json(signed.to_json()) == signed
    moved = SignedReceipt(dataclasses.replace(receipt, rollback_gen=1), DOMAIN, signed.sender_signature)
    with pytest.raises(Exception, match="recovers to"):  # a signature of one generation does not cover another
        countersign(moved, tail_id.account)
    with pytest.raises(ReceiptError, match="rollbackStep"):
        dataclasses.replace(receipt, rollback_gen=0)
    with pytest.raises(ReceiptError, match="rollbackGen"):
        dataclasses.replace(receipt, rollback_gen=1 << 32)
