"""Token ids on the wire: uint16 up to 65,536 tokens, uint32 beyond, named in the header and checked."""

from __future__ import annotations

import pytest
import torch

from node.errors import DtypeMismatchError
from node.training.worker import StageWorker, bytes_to_window, window_to_bytes
from node.wire import frames
from sharding import ModelConfig, OptimConfig, partition


def _spec(id_bytes: int) -> frames.FrameSpec:
    return frames.FrameSpec(spec_hash=bytes(32), codec=frames.CodecId.DENSE, microbatch_size=2, seq_len=4, d_model=8,
                            bytes_per_token=32, id_bytes=id_bytes, max_frame_bytes=4096)


def _activation(spec: frames.FrameSpec, id_dtype: frames.IdDtype) -> frames.FrameHeader:
    raw = frames.encode_frame(frames.Kind.ACTIVATION, spec.spec_hash, 0, 1, 0, payload=b"\x01" * spec.payload_len,
                              window=b"\x00" * spec.window_len, codec=spec.codec, dtype=spec.dtype, shape=spec.shape,
                              id_dtype=id_dtype)
    fr = frames.decode_frame(raw, spec.max_frame_bytes)
    assert len(raw) == frames.HEADER_SIZE + spec.window_len + spec.payload_len  # ids counted in the wire bytes
    return fr.header


def test_large_vocabulary_sends_uint32_ids_counted_in_the_frame() -> None:
    config = ModelConfig(vocab_size=70_000, seq_len=4, d_model=8, n_layers=2, n_heads=2)
    worker = StageWorker(config, partition(config, 2)[1], codec="dense", optim=OptimConfig(), num_microbatches=1,
                         microbatch_size=2)
    spec = worker.frame_spec(1 << 20)
    assert (spec.id_bytes, spec.id_dtype, spec.window_len) == (4, frames.IdDtype.UINT32, 4 * 2 * 5)
    window = torch.tensor([[0, 1, 65_536, 69_999, 3]] * 2)
    raw = window_to_bytes(window, spec.id_bytes)
    assert len(raw) == spec.window_len
    assert torch.equal(bytes_to_window(raw, 2, 4, spec.id_bytes, config.vocab_size), window)
    h = _activation(spec, frames.IdDtype.UINT32)
    assert h.id_dtype == frames.IdDtype.UINT32
    frames.check_data_header(h, spec)


@pytest.mark.parametrize(("id_bytes", "sent"), [(2, frames.IdDtype.UINT32), (4, frames.IdDtype.UINT16)])
def test_frame_whose_id_dtype_disagrees_with_the_model_is_refused(id_bytes: int, sent: frames.IdDtype) -> None:
    spec = _spec(id_bytes)
    h = frames.FrameHeader(**{**_activation(spec, spec.id_dtype).__dict__, "id_dtype": sent})
    with pytest.raises(DtypeMismatchError, match=f"token ids {sent.name.lower()}.*{spec.id_dtype.name.lower()}"):
        frames.check_data_header(h, spec)


def test_unknown_id_dtype_byte_is_a_frame_error() -> None:
    from node.errors import FrameError

    raw = bytearray(frames.encode_frame(frames.Kind.ACTIVATION, bytes(32), 0, 1, 0))
    raw[4 + 1 + 1 + 2 + 32 + 2 + 8 + 4 + 3] = 7  # the id dtype byte (after codec, dtype, ndim)
    with pytest.raises(FrameError, match="unknown enum value"):
        frames.decode_header(bytes(raw), 1 << 20)


def test_vocabulary_bound_names_the_id_dtype() -> None:
    ModelConfig(vocab_size=2**32, seq_len=4, d_model=8, n_layers=1, n_heads=2).validate()
    with pytest.raises(ValueError, match=r"vocab_size=4294967297: token ids travel as uint32"):
        ModelConfig(vocab_size=2**32 + 1, seq_len=4, d_model=8, n_layers=1, n_heads=2).validate()
