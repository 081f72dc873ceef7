"""Receipt CPU per activation frame: the node's hop receipts against eth-account's general EIP-712 encoder.

Every data frame between stages carries the sender's EIP-712 receipt signature, and its ACK the receiver's
countersignature (`node.services.hop_receipts.EIP712Receipts`): per frame the sender signs, the receiver recovers
the sender's signature and countersigns, and the sender recovers the countersignature. Both arms do exactly
that for the same frames with the same keys, one after the other in this process:

  general   eth-account's `encode_typed_data` for every message (the node's path before session 21)
  node      `EIP712Receipts` as the node runs it: receipts hashed from their fixed 32-byte words under a cached
            domain separator (`protocol.receipts._signable`), the node key's address derived once

Both sign with eth-account over the same digest, so the signatures are identical (checked). Reported: CPU
milliseconds per frame (process time, both ends together) per arm, best of `--repeats` rounds, and the
speed-up. Prints a table; the last line is JSON.

    python benchmarks/receipts.py --quick    # a few hundred frames, seconds
    python benchmarks/receipts.py            # 2000 frames x 5 rounds

Measured here (session 21, 2 cores, a replica-averaging benchmark running beside it): general 1.306 ms of CPU per
frame, node 0.593 ms: 2.20x, signatures identical. The local swarm benchmarks run without chain services, so
they sign no receipts and their per-frame figures do not include this cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eth_account import Account  # noqa: E402
from eth_account.messages import encode_typed_data  # noqa: E402

from node.services.hop_receipts import EIP712Receipts  # noqa: E402
from node.wire import frames  # noqa: E402
from protocol.receipts import RECEIPT_TYPES, Domain, Receipt  # noqa: E402

DOMAIN = Domain(31337, "0x" + "5f" * 20)


def _headers(n: int) -> list[frames.FrameHeader]:
    """Activation frame headers of n microbatches (distinct digests)."""
    return [frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=b"\x01" * 32, stage=1, step=i // 16,
                               microbatch=i % 16, digest=i.to_bytes(32, "big")) for i in range(n)]


def run_node(sender: EIP712Receipts, receiver: EIP712Receipts, headers: list[frames.FrameHeader]) -> list[bytes]:
    """The node's receipts for every frame: sign, countersign, ACK check; the countersignatures."""
    out = []
    for h in headers:
        sig = sender.sign(h, receiver.account.address)
        counter = receiver.countersign(h, sig, sender.account.address)
        sender.on_ack(h, counter, receiver.account.address)
        out.append(counter)
    return out


def run_general(sender: EIP712Receipts, receiver: EIP712Receipts, headers: list[frames.FrameHeader]) -> list[bytes]:
    """The same three operations per frame through eth-account's general encoder."""
    out = []
    domain = DOMAIN.to_eip712()
    for h in headers:
        receipt = Receipt(model_id=7, epoch=0, step=h.step, microbatch=h.microbatch, stage=h.stage, direction=0,
                          sender=sender.account.address, receiver=receiver.account.address, payload_digest=h.digest,
                          tokens=256)
        sig = Account.sign_message(encode_typed_data(domain, RECEIPT_TYPES, receipt.message()), sender.account.key)
        if Account.recover_message(encode_typed_data(domain, RECEIPT_TYPES, receipt.message()),
                                   signature=sig.signature) != sender.account.address:
            raise AssertionError("the sender's signature does not recover")
        counter = Account.sign_message(encode_typed_data(domain, RECEIPT_TYPES, receipt.message()),
                                       receiver.account.key)
        if Account.recover_message(encode_typed_data(domain, RECEIPT_TYPES, receipt.message()),
                                   signature=counter.signature) != receiver.account.address:
            raise AssertionError("the countersignature does not recover")
        out.append(bytes(counter.signature))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few hundred frames, 2 rounds")
    p.add_argument("--frames", type=int, default=None, help="frames per round (default 2000, quick 200)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per arm, the best kept (default 5, quick 2)")
    a = p.parse_args(argv)
    n = a.frames if a.frames is not None else (200 if a.quick else 2000)
    repeats = a.repeats if a.repeats is not None else (2 if a.quick else 5)
    if n < 1 or repeats < 1:
        p.error(f"--frames {n} and --repeats {repeats} must be at least 1")
    keys = [Account.from_key(bytes([k]) * 32) for k in (1, 2)]
    headers = _headers(n)
    best: dict[str, float] = {}
    sigs: dict[str, list[bytes]] = {}
    for _ in range(repeats):
        for name, fn in (("general", run_general), ("node", run_node)):
            sender, receiver = (EIP712Receipts(k, DOMAIN, 7, 256) for k in keys)
            t0 = time.process_time()
            sigs[name] = fn(sender, receiver, headers)
            best[name] = min(best.get(name, float("inf")), (time.process_time() - t0) / n * 1e3)
    if sigs["general"] != sigs["node"]:
        raise AssertionError("the two arms' countersignatures differ")
    print(f"{'arm':10} {'CPU ms per frame':>17}")
    for name in ("general", "node"):
        print(f"{name:10} {best[name]:>17.3f}")
    print(f"speed-up {best['general'] / best['node']:.2f}x over {n} frames, best of {repeats}")
    print(json.dumps({"cpu_ms_per_frame": best, "speedup": best["general"] / best["node"], "frames": n,
                      "repeats": repeats, "signatures_identical": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
