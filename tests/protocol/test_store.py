"""sqlite receipt store: durable, replay-free, and unchanged by rejected input."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.errors import DomainError, ReplayError, SignatureError, UnregisteredKeyError
from protocol.receipts import Domain, Receipt, StaticKeyRegistry, countersign, payload_digest, sign_receipt
from protocol.store import ReceiptStore, StoreConfig


def _signed(keys, domain, microbatch=0, cosign=True, **over):
    fields = dict(
        model_id=2**200 + 1, epoch=3, step=1, microbatch=microbatch, stage=1, direction=0,
        sender=keys[1].address, receiver=keys[2].address, payload_digest=payload_digest(b"x%d" % microbatch),
        tokens=64,
    )
    fields.update(over)
    s = sign_receipt(Receipt(**fields), domain, keys[1])
    return countersign(s, keys[2]) if cosign else s


def test_store_persists_across_reopen(tmp_path, keys, domain, registry):
    config = StoreConfig(data_dir=tmp_path / "node")
    with ReceiptStore(config, domain, registry) as store:
        for m in range(3):
            store.add(_signed(keys, domain, m))
    with ReceiptStore(config, domain, registry) as store:
        got = store.epoch_receipts(2**200 + 1, 3)
        assert [s.receipt.microbatch for s in got] == [0, 1, 2]
        assert got[0] == _signed(keys, domain, 0)
        assert store.epoch_receipts(2**200 + 1, 4) == []


def test_duplicate_is_replay_and_keeps_original(tmp_path, keys, domain, registry):
    with ReceiptStore(StoreConfig(tmp_path), domain, registry) as store:
        original = _signed(keys, domain, 0)
        store.add(original)
        replay = _signed(keys, domain, 0, payload_digest=payload_digest(b"other"))
        with pytest.raises(ReplayError):
            store.add(replay)
        assert store.count() == 1
        assert store.get(original.receipt.key) == original


def test_rejected_inputs_change_nothing(tmp_path, keys, domain, registry):
    with ReceiptStore(StoreConfig(tmp_path), domain, registry) as store:
        store.add(_signed(keys, domain, 0))
        with pytest.raises(DomainError):
            store.add(_signed(keys, Domain(99, domain.verifying_contract), 1))
        forged = dataclasses.replace(_signed(keys, domain, 2), sender_signature=b"\x01" * 65)
        with pytest.raises(SignatureError):
            store.add(forged)
        outsider = StaticKeyRegistry([keys[1].address])
        with ReceiptStore(StoreConfig(tmp_path), domain, outsider) as strict:
            with pytest.raises(UnregisteredKeyError):
                strict.add(_signed(keys, domain, 3))
        assert store.count() == 1


def test_countersignature_attached_once(tmp_path, keys, domain, registry):
    with ReceiptStore(StoreConfig(tmp_path), domain, registry) as store:
        pending = _signed(keys, domain, 0, cosign=False)
        store.add(pending)
        assert store.epoch_receipts(2**200 + 1, 3, cosigned_only=True) == []
        acked = countersign(pending, keys[2])
        store.add_countersignature(acked)
        assert store.get(pending.receipt.key) == acked
        with pytest.raises(ReplayError):
            store.add_countersignature(acked)
        with pytest.raises(SignatureError):
            store.add_countersignature(_signed(keys, domain, 5))
        assert store.count() == 1


def test_bad_config_is_value_error(tmp_path, domain, registry):
    with pytest.raises(ValueError, match="busy_timeout_s"):
        ReceiptStore(StoreConfig(tmp_path, busy_timeout_s=0), domain, registry)


def test_the_rollback_generation_is_kept_and_a_rerun_of_a_stored_key_is_a_replay(tmp_path, keys, domain, registry):
    config = StoreConfig(tmp_path)
    rerun = _signed(keys, domain, 0, rollback_gen=2, rollback_step=5)
    with ReceiptStore(config, domain, registry) as store:
        store.add(rerun)
        with pytest.raises(ReplayError):  # the replay key carries no generation: the first run's credit is kept
            store.add(_signed(keys, domain, 0, rollback_gen=3, rollback_step=4))
    with ReceiptStore(config, domain, registry) as store:
        kept = store.get(rerun.receipt.key)
        assert kept is not None and kept == rerun and kept.receipt.generation == (2, 5)
