"""Where and how a stage executes: device choice, free memory, mixed precision, optimizer kernels.

`resolve_device` is pure given its probes (tests pass fakes): "auto" = first CUDA device, else MPS,
else CPU. `ExecutionPolicy` says how a stage runs on that device: autocast dtype (bf16 on CUDA by
default, fp32 elsewhere; fp32 master weights and optimizer state always), AdamW kernel (fused on
CUDA, the single-tensor loop on CPU so the golden losses stay bit-exact), `torch.compile` and
activation checkpointing (both off by default). Nothing here touches the transformer blocks.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 elsewhere
ADAMW_IMPLS = ("auto", "fused", "foreach", "single")  # auto: fused on CUDA, single-tensor loop elsewhere
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class DeviceProbe:
    """What the machine offers (the real torch calls by default; tests pass fixed values)."""

    cuda_count: int  # number of visible CUDA devices (0 when torch.cuda.is_available() is False)
    mps: bool  # torch.backends.mps.is_available()

    @classmethod
    def detect(cls) -> DeviceProbe:
        """The machine's devices, as torch sees them."""
        cuda = torch.cuda.is_available()
        mps_backend = getattr(torch.backends, "mps", None)
        mps = bool(mps_backend is not None and mps_backend.is_available())
        return cls(torch.cuda.device_count() if cuda else 0, mps)

    def found(self) -> str:
        """The devices found, for error messages ("cpu", "cuda:0, cuda:1, cpu", ...)."""
        names = [f"cuda:{i}" for i in range(self.cuda_count)] + (["mps"] if self.mps else []) + ["cpu"]
        return ", ".join(names)


def resolve_device(choice: str, probe: DeviceProbe | None = None) -> torch.device:
    """The torch device for `choice` (auto|cpu|cuda|cuda:N|mps); DeviceError (one line) when it is absent."""
    p = probe if probe is not None else DeviceProbe.detect()
    m = _DEVICE_RE.match(choice.strip().lower()) if isinstance(choice, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"--device {choice!r}: not a device; choose one of {', '.join(DEVICE_CHOICES)}")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        if p.cuda_count > 0:
            return torch.device("cuda", 0)
        return torch.device("mps") if p.mps else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not p.mps:
            raise DeviceError(f"--device mps: no MPS device (torch.backends.mps.is_available() is False; "
                              f"found: {p.found()})")
        return torch.device("mps")
    if p.cuda_count == 0:
        raise DeviceError(f"--device {choice}: no CUDA device found (torch.cuda.is_available() is False; "
                          f"found: {p.found()})")
    i = int(index) if index is not None else 0
    if i >= p.cuda_count:
        raise DeviceError(f"--device {choice}: only {p.cuda_count} CUDA device(s) (found: {p.found()})")
    return torch.device("cuda", i)


@dataclass(frozen=True)
class DeviceInfo:
    """A device's name and memory as seen at start."""

    device: torch.device  # the resolved device
    name: str  # product name ("NVIDIA H200", the CPU model, "Apple MPS")
    free_bytes: int | None  # memory free for this process's tensors (None: unknown)
    total_bytes: int | None  # total memory of the device (None: unknown)

    def line(self) -> str:
        """One human line: `device cuda:0 (NVIDIA H200): 139.1 GiB free of 139.8 GiB`."""
        def gib(n: int | None) -> str:
            return "?" if n is None else f"{n / 2**30:.1f} GiB"
        return f"device {self.device} ({self.name}): {gib(self.free_bytes)} free of {gib(self.total_bytes)}"


def _meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo as bytes per key (empty where there is no such file)."""
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        return {}
    return out


def _cpu_name(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device, meminfo: Callable[[], dict[str, int]] = _meminfo) -> DeviceInfo:
    """Name and free/total memory of `device` (CUDA: mem_get_info; CPU: /proc/meminfo MemAvailable)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceInfo(device, torch.cuda.get_device_name(device), int(free), int(total))
    if device.type == "mps":
        limit: int | None = None
        if hasattr(torch.mps, "recommended_max_memory"):
            limit = int(torch.mps.recommended_max_memory())
        used = int(torch.mps.driver_allocated_memory()) if hasattr(torch.mps, "driver_allocated_memory") else 0
        return DeviceInfo(device, "Apple MPS", None if limit is None else max(0, limit - used), limit)
    if device.type == "meta":
        return DeviceInfo(device, "meta", None, None)
    mem = meminfo()
    return DeviceInfo(device, _cpu_name(), mem.get("MemAvailable"), mem.get("MemTotal"))


@dataclass(frozen=True)
class ExecutionPolicy:
    """How one stage executes: device, precision, optimizer kernel, compile, activation checkpointing."""

    device: str = "cpu"  # torch device string (already resolved: "cpu", "cuda:0", "mps", "meta")
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, or bf16 (autocast, also on CPU)
    adamw: str = "auto"  # AdamW kernel: auto (fused on CUDA, single-tensor elsewhere), fused, foreach, single
    compile: bool = False  # wrap the stage in torch.compile (off until measured on the target device)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (saves memory)
    memory_headroom: float = 0.9  # a stage may plan to use at most this fraction of the device's free memory

    def validate(self) -> ExecutionPolicy:
        """Raise DeviceError naming the bad field; return self."""
        if self.precision not in PRECISIONS:
            raise DeviceError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.adamw not in ADAMW_IMPLS:
            raise DeviceError(f"adamw {self.adamw!r}: choose one of {', '.join(ADAMW_IMPLS)}")
        if not 0 < self.memory_headroom <= 1:
            raise DeviceError(f"memory_headroom {self.memory_headroom!r}: must be in (0, 1]")
        if self.adamw == "fused" and self.torch_device.type not in ("cuda", "mps", "cpu"):
            raise DeviceError(f"adamw fused: not supported on {self.device}")
        return self

    @property
    def torch_device(self) -> torch.device:
        """The device as a torch.device."""
        return torch.device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 when the stage runs under bf16 autocast, None when it runs in fp32."""
        if self.precision == "bf16" or (self.precision == "auto" and self.torch_device.type == "cuda"):
            return torch.bfloat16
        return None

    @property
    def compute_dtype_name(self) -> str:
        """"bf16" or "fp32": the precision the stage's matmuls run in."""
        return "fp32" if self.autocast_dtype is None else "bf16"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context for forward passes (backward follows the forward's dtypes): autocast or nothing."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=dtype)

    def adamw_kwargs(self) -> dict[str, bool]:
        """`fused`/`foreach` arguments of torch.optim.AdamW for this device."""
        impl = self.adamw
        if impl == "auto":
            impl = "fused" if self.torch_device.type == "cuda" else "single"
        if impl == "fused":
            return {"fused": True}
        return {"foreach": impl == "foreach"}


def policy_for(choice: str, probe: DeviceProbe | None = None, **fields: Any) -> ExecutionPolicy:
    """An ExecutionPolicy on the device `choice` resolves to (other fields as given)."""
    return ExecutionPolicy(device=str(resolve_device(choice, probe)), **fields).validate()


@contextlib.contextmanager
def host_sync(device: torch.device) -> Iterator[None]:
    """Wait for `device`'s queued work on exit (after non-blocking device-to-host copies)."""
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()
