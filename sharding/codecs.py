"""Boundary codecs: what crosses a stage boundary, forwards (activations) and backwards (gradients).

Payload layouts (little-endian, row-major over (B, T, ...)):
- dense:  fp32 h, 4*d bytes per token.
- bf16:   bf16 h, 2*d bytes per token.
- int8:   fp32 per-token scale block (B*T*4 bytes), then int8 values (B*T*d); d+4 bytes per token.
- subspace: bf16 z = U^T (h - E_fixed[ids]), 2*k bytes per token (gradient: bf16 U^T g).
- subspace-fp32: as subspace with fp32 z (4*k); subspace-int8: bf16 per-token scales then int8 z (k+2).

Device: encoding runs on the tensor's device (the projection U^T h, casts and quantisation there); only
the wire vectors cross to host memory, through a pinned buffer and a non-blocking copy on CUDA. Decoding
takes `device=` and moves the wire vectors there before expanding them (E_fixed[ids] + U z on the
device). Inputs are fp32; a codec built with `low_precision_inputs=True` also takes bf16 and fp16
tensors (exact in fp32, the codec's working precision; what goes on the wire is unchanged). float64 is
always refused: narrowing it would be a silent cast.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import CodecError
from .subspace import fixed_embedding, subspace_basis

CODEC_NAMES = ("dense", "bf16", "int8", "subspace", "subspace-fp32", "subspace-int8")
# stable numeric ids for wire headers
CODEC_IDS = {name: i for i, name in enumerate(CODEC_NAMES)}


def token_id_bytes(config: ModelConfig) -> int:
    """Bytes per token of the token-id window travelling beside every forward payload (uint16)."""
    return 2 if config.vocab_size <= 65536 else 4


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor dtype={x.dtype} shape={tuple(x.shape)} device={x.device}"
    return type(x).__name__


LOW_PRECISION_INPUTS = (torch.float32, torch.bfloat16, torch.float16)  # accepted with low_precision_inputs


def _tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (fp32, int8 or int16 views) on any device.

    CUDA: copied into a pinned host buffer (torch's caching host allocator) with a non-blocking copy,
    then the stream is synchronised once before the bytes are read.
    """
    t = t.detach().contiguous()
    if t.device.type == "cpu":
        return t.numpy().tobytes()
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host.numpy().tobytes()
    return t.cpu().numpy().tobytes()


def _bytes_to_tensor(payload: bytes | bytearray | memoryview, dtype: torch.dtype, count: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=dtype, count=count)


def _to_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """Move a freshly decoded host tensor to `device` (pinned + non-blocking on CUDA); CPU: itself."""
    if device is None or device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Codec:
    """Base codec: plain vectors of width `width` per token, with validation of every input."""

    name = "base"

    def __init__(self, config: ModelConfig) -> None:
        config.validate()
        self.config = config
        self.input_dtypes: tuple[torch.dtype, ...] = (torch.float32,)  # dtypes encode_* accepts

    def allow_low_precision_inputs(self) -> Codec:
        """Also accept bf16 and fp16 tensors (autocast outputs); the wire format does not change."""
        self.input_dtypes = LOW_PRECISION_INPUTS
        return self

    @property
    def bytes_per_token(self) -> int:
        """Exact activation (and gradient) payload bytes per token."""
        raise NotImplementedError

    # -- validation -------------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor) -> tuple[int, int]:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (
            torch.long,
            torch.int32,
            torch.int16,
            torch.uint16,
            torch.uint8,
        ):
            raise CodecError(f"{self.name}: ids must be an integer tensor (B, T), got {_describe(ids)}")
        b, t = ids.shape
        if b < 1 or t < 1 or t > self.config.seq_len:
            raise CodecError(f"{self.name}: ids shape {(b, t)} needs B >= 1 and 1 <= T <= {self.config.seq_len}")
        return int(b), int(t)

    def _check_tensor(self, x: torch.Tensor, ids: torch.Tensor, what: str) -> tuple[int, int]:
        b, t = self._check_ids(ids)
        expect = (b, t, self.config.d_model)
        if not isinstance(x, torch.Tensor):
            raise CodecError(f"{self.name}: {what} must be a torch tensor, got {_describe(x)}")
        if x.dtype not in self.input_dtypes:
            names = " or ".join(str(d).removeprefix("torch.") for d in self.input_dtypes)
            raise CodecError(f"{self.name}: {what} must be {names}, got {x.dtype} (no silent casts)")
        if tuple(x.shape) != expect:
            raise CodecError(f"{self.name}: {what} must have shape {expect}, got {tuple(x.shape)} (no reshapes)")
        if not bool(torch.isfinite(x).all()):
            raise CodecError(f"{self.name}: {what} contains NaN or Inf")
        return b, t

    def _check_payload(self, payload: object, b: int, t: int, what: str) -> None:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CodecError(f"{self.name}: {what} payload must be bytes, got {type(payload).__name__}")
        expect = b * t * self.bytes_per_token
        if len(payload) != expect:
            raise CodecError(
                f"{self.name}: {what} payload has {len(payload)} bytes, expected {expect} "
                f"(B={b} x T={t} x {self.bytes_per_token} bytes/token)"
            )

    def _check_decoded(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if not bool(torch.isfinite(x).all()):
            raise CodecError(f"{self.name}: decoded {what} contains NaN or Inf")
        return x

    # -- public API -------------------------------------------------------------------------------
    def encode_activation(self, h: torch.Tensor, ids: torch.Tensor) -> bytes:
        """Encode the boundary hidden state h (B, T, d) fp32."""
        b, t = self._check_tensor(h, ids, "activation")
        return self._encode(self._act_in(h, ids), b, t, "activation")

    def decode_activation(self, payload: bytes, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Decode to the boundary hidden state (B, T, d) fp32, on `device` (default: CPU)."""
        b, t = self._check_ids(ids)
        self._check_payload(payload, b, t, "activation")
        v = self._decode(payload, b, t, device)
        return self._check_decoded(self._act_out(v, ids.to(v.device)), "activation")

    def encode_gradient(self, g: torch.Tensor, ids: torch.Tensor) -> bytes:
        """Encode the gradient of the loss w.r.t. the boundary hidden state (B, T, d) fp32."""
        b, t = self._check_tensor(g, ids, "gradient")
        return self._encode(self._grad_in(g), b, t, "gradient")

    def decode_gradient(self, payload: bytes, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Decode to a gradient w.r.t. the boundary hidden state (B, T, d) fp32, on `device` (default: CPU)."""
        b, t = self._check_ids(ids)
        self._check_payload(payload, b, t, "gradient")
        return self._check_decoded(self._grad_out(self._decode(payload, b, t, device)), "gradient")

    def wire_vectors(self, x: torch.Tensor, ids: torch.Tensor, gradient: bool = False) -> torch.Tensor:
        """The (B, T, width) vectors this codec puts on the wire for x, before rounding (z for subspace)."""
        self._check_tensor(x, ids, "gradient" if gradient else "activation")
        return self._grad_in(x) if gradient else self._act_in(x, ids)

    # -- hooks: map to/from the wire vectors (B, T, width) ----------------------------------------
    def _act_in(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return h

    def _act_out(self, v: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return v

    def _grad_in(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def _grad_out(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def _encode(self, v: torch.Tensor, b: int, t: int, what: str) -> bytes:
        raise NotImplementedError

    def _decode(self, payload: bytes, b: int, t: int, device: torch.device | None) -> torch.Tensor:
        raise NotImplementedError


class _Fp32Wire(Codec):
    width: int

    @property
    def bytes_per_token(self) -> int:
        return 4 * self.width

    def _encode(self, v: torch.Tensor, b: int, t: int, what: str) -> bytes:
        return _tensor_to_bytes(v.to(torch.float32))

    def _decode(self, payload: bytes, b: int, t: int, device: torch.device | None) -> torch.Tensor:
        raw = _bytes_to_tensor(payload, torch.float32, b * t * self.width)
        return _to_device(raw, device).view(b, t, self.width)


class _Bf16Wire(Codec):
    width: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.width

    def _encode(self, v: torch.Tensor, b: int, t: int, what: str) -> bytes:
        w = v.to(torch.bfloat16)
        if not bool(torch.isfinite(w).all()):
            raise CodecError(f"{self.name}: {what} overflows bfloat16")
        return _tensor_to_bytes(w.view(torch.int16))

    def _decode(self, payload: bytes, b: int, t: int, device: torch.device | None) -> torch.Tensor:
        raw = _to_device(_bytes_to_tensor(payload, torch.int16, b * t * self.width), device)
        return raw.view(torch.bfloat16).to(torch.float32).view(b, t, self.width)


class _Int8Wire(Codec):
    """int8 values with a per-token absmax scale (fp32 or bf16)."""

    width: int
    scale_dtype: torch.dtype = torch.float32

    @property
    def _scale_bytes(self) -> int:
        return 4 if self.scale_dtype == torch.float32 else 2

    @property
    def bytes_per_token(self) -> int:
        return self.width + self._scale_bytes

    def _encode(self, v: torch.Tensor, b: int, t: int, what: str) -> bytes:
        v = v.to(torch.float32)
        amax = v.abs().amax(dim=-1, keepdim=True)
        scale = (amax / 127.0).to(self.scale_dtype)
        if not bool(torch.isfinite(scale).all()):
            raise CodecError(f"{self.name}: {what} scale overflows {self.scale_dtype}")
        s32 = scale.to(torch.float32)
        safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
        q = torch.clamp(torch.round(v / safe), -127, 127).to(torch.int8)
        raw_scale = scale if self.scale_dtype == torch.float32 else scale.view(torch.int16)
        return _tensor_to_bytes(raw_scale) + _tensor_to_bytes(q)

    def _decode(self, payload: bytes, b: int, t: int, device: torch.device | None) -> torch.Tensor:
        n = b * t
        sb = n * self._scale_bytes
        head = bytes(payload[:sb])
        if self.scale_dtype == torch.float32:
            scale = _to_device(_bytes_to_tensor(head, torch.float32, n), device)
        else:
            raw = _to_device(_bytes_to_tensor(head, torch.int16, n), device)
            scale = raw.view(self.scale_dtype).to(torch.float32)
        q = _to_device(_bytes_to_tensor(bytes(payload[sb:]), torch.int8, n * self.width), device).to(torch.float32)
        return (q.view(n, self.width) * scale.view(n, 1)).view(b, t, self.width)


class DenseCodec(_Fp32Wire):
    """fp32 hidden state, exact."""

    name = "dense"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.width = config.d_model


class Bf16Codec(_Bf16Wire):
    """bf16 hidden state."""

    name = "bf16"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.width = config.d_model


class Int8Codec(_Int8Wire):
    """int8 hidden state with a per-token fp32 absmax scale."""

    name = "int8"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.width = config.d_model


class _SubspaceMixin(Codec):
    """Sends z = U^T (h - E_fixed[ids]) forwards and U^T g backwards; needs config.subspace_rank."""

    def _setup(self, config: ModelConfig) -> None:
        if config.subspace_rank is None:
            raise CodecError(
                f"{self.name}: ModelConfig.subspace_rank is None; the subspace codec needs a subspace model"
            )
        self.width = config.subspace_rank
        self.u = subspace_basis(config)
        self.e_fixed = fixed_embedding(config)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _fixed(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """U and E_fixed on `device` (copied there once)."""
        if device.type == "cpu":
            return self.u, self.e_fixed
        if device not in self._on_device:
            self._on_device[device] = (self.u.to(device), self.e_fixed.to(device))
        return self._on_device[device]

    def _check_ids(self, ids: torch.Tensor) -> tuple[int, int]:
        b, t = super()._check_ids(ids)
        lo, hi = int(ids.long().min()), int(ids.long().max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise CodecError(f"{self.name}: ids must lie in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        return b, t

    def _act_in(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        u, e_fixed = self._fixed(h.device)
        return (h.to(torch.float32) - e_fixed[ids.to(h.device).long()]) @ u

    def _act_out(self, v: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        u, e_fixed = self._fixed(v.device)
        return e_fixed[ids.long()] + v @ u.t()

    def _grad_in(self, g: torch.Tensor) -> torch.Tensor:
        return g.to(torch.float32) @ self._fixed(g.device)[0]

    def _grad_out(self, v: torch.Tensor) -> torch.Tensor:
        return v @ self._fixed(v.device)[0].t()


class SubspaceCodec(_SubspaceMixin, _Bf16Wire):
    """k subspace coordinates per token in bf16."""

    name = "subspace"

    def __init__(self, config: ModelConfig) -> None:
        Codec.__init__(self, config)
        self._setup(config)


class SubspaceFp32Codec(_SubspaceMixin, _Fp32Wire):
    """k subspace coordinates per token in fp32 (exact up to float rounding)."""

    name = "subspace-fp32"

    def __init__(self, config: ModelConfig) -> None:
        Codec.__init__(self, config)
        self._setup(config)


class SubspaceInt8Codec(_SubspaceMixin, _Int8Wire):
    """k subspace coordinates per token in int8 with a bf16 per-token scale."""

    name = "subspace-int8"
    scale_dtype = torch.bfloat16

    def __init__(self, config: ModelConfig) -> None:
        Codec.__init__(self, config)
        self._setup(config)


_REGISTRY: dict[str, type[Codec]] = {
    "dense": DenseCodec,
    "bf16": Bf16Codec,
    "int8": Int8Codec,
    "subspace": SubspaceCodec,
    "subspace-fp32": SubspaceFp32Codec,
    "subspace-int8": SubspaceInt8Codec,
}


def get_codec(name: str, config: ModelConfig, *, low_precision_inputs: bool = False) -> Codec:
    """The codec called `name` for `config` (also taking bf16/fp16 inputs when asked); unknown names raise CodecError."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise CodecError(f"unknown codec {name!r}; choose one of {list(CODEC_NAMES)}")
    codec = cls(config)
    return codec.allow_low_precision_inputs() if low_precision_inputs else codec
