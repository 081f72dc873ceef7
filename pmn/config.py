"""Role configuration: one TOML file per role, every field documented, environment overrides.

Precedence: dataclass default < TOML file < environment variable `PMN_<FIELD>` (upper case)
< command-line flag. Example files live in `configs/` at the repository root.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pmn.errors import ConfigError

DEFAULT_HOME = "~/.pmn"  # expanded with Path.expanduser() where used; $PMN_HOME is not consulted


@dataclass
class ChainSettings:
    """Where the chain is and which contracts to use (shared by every role)."""

    rpc_url: str = ""  # JSON-RPC URL of the chain; empty = the embedded in-process chain (demo/tests only)
    deployment: str = f"{DEFAULT_HOME}/deployment.json"  # deployment file: chain id, addresses, ABIs
    rpc_retries: int = 3  # attempts per RPC call on a connection error before giving up
    rpc_backoff_s: float = 0.5  # first backoff between RPC attempts, doubled after each failure
    rpc_timeout_s: float = 10.0  # HTTP timeout of one RPC request


@dataclass
class OperatorConfig(ChainSettings):
    """A GPU owner running a node (`pmn node start`, `pmn node status`, `pmn wallet`)."""

    keystore: str = f"{DEFAULT_HOME}/operator.json"  # encrypted keystore of the operator account (stake, payouts)
    data_dir: str = f"{DEFAULT_HOME}/node"  # node state: node key + peer key, checkpoints, receipts database
    model: str = "tiny"  # model spec: a preset name, a spec TOML path (`pmn propose` format) or a ModelConfig JSON path
    stages: int = 3  # pipeline stages the model is split into (a spec TOML's [training] stages wins)
    stage: str = "auto"  # pipeline stage to serve: "auto" or a stage index
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])  # libp2p listen multiaddrs
    bootstrap: list[str] = field(default_factory=list)  # multiaddrs (with /p2p/<id>) of peers to join through
    metrics_port: int = 0  # Prometheus metrics HTTP port; 0 = disabled
    capacity: int = 1  # declared capacity units; the stake required scales with it
    device: str = "auto"  # compute device: auto (first CUDA device, else MPS, else CPU), cpu, cuda, cuda:N, mps
    model_id: int = 0  # on-chain model id; with rpc_url set, the node signs receipts and serves paid inference


@dataclass
class ResearcherConfig(ChainSettings):
    """A researcher proposing models (`pmn propose`, `pmn models`)."""

    keystore: str = f"{DEFAULT_HOME}/researcher.json"  # encrypted keystore of the proposing account
    metadata_uri: str = ""  # where the human-readable description of the proposal lives (any URI)


@dataclass
class HolderConfig(ChainSettings):
    """A share holder (`pmn shares`, `pmn claim`, `pmn infer`): needs only an RPC URL and the deployment file."""

    keystore: str = f"{DEFAULT_HOME}/holder.json"  # encrypted keystore of the holder account
    bootstrap: list[str] = field(default_factory=list)  # stage peers to send inference requests through
    outbox_dir: str = f"{DEFAULT_HOME}/outbox"  # chain outbox: fees and claims recorded before sending (a file per account)
    outbox_retry_interval_s: float = 0.5  # wait after the first outbox pass the chain did not answer
    outbox_max_backoff_s: float = 5.0  # cap on that wait while the chain stays down (doubled per failed pass)
    outbox_call_timeout_s: float = 5.0  # HTTP timeout of one JSON-RPC request of the outbox
    outbox_wait_s: float = 60.0  # longest one command waits for the chain to take a payment or claim (it stays queued)


C = TypeVar("C")


def _coerce(name: str, raw: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (list,):
        if isinstance(raw, str):
            raw = [part for part in (p.strip() for p in raw.split(",")) if part]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"field '{name}' must be a list of strings, got {raw!r}")
        return list(raw)
    if isinstance(typ, types.UnionType):
        typ = str
    try:
        if typ is bool:
            if isinstance(raw, str):
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if typ is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if typ is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"field '{name}' must be {getattr(typ, '__name__', typ)}, got {raw!r}") from None


def load_config(cls: type[C], path: Path | None = None, env: dict[str, str] | None = None) -> C:
    """Build a role config from its defaults, an optional TOML file and `PMN_*` environment variables."""
    env = dict(os.environ) if env is None else env
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        for key, raw in data.items():
            values[key] = _coerce(key, raw, hints[key])
    for key in names:
        env_key = f"PMN_{key.upper()}"
        if env_key in env:
            values[key] = _coerce(env_key, env[env_key], hints[key])
    return cls(**values)


def render_example(cls: type) -> str:
    """A TOML document with every field of `cls`, its default and its comment (for `configs/`)."""
    import inspect

    source = inspect.getsource(cls)
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            source = inspect.getsource(base) + source
    comments: dict[str, str] = {}
    for line in source.splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith(("#", '"')):
            name = stripped.split(":", 1)[0].strip()
            comments[name] = stripped.split("#", 1)[1].strip()
    lines = [f"# {cls.__doc__.strip() if cls.__doc__ else cls.__name__}", "# Every field may be overridden by PMN_<FIELD>.", ""]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        lines.append(f"# {comments.get(f.name, '')}")
        if isinstance(default, str):
            lines.append(f'{f.name} = "{default}"')
        elif isinstance(default, bool):
            lines.append(f"{f.name} = {'true' if default else 'false'}")
        elif isinstance(default, list):
            lines.append(f"{f.name} = [{', '.join(chr(34) + x + chr(34) for x in default)}]")
        else:
            lines.append(f"{f.name} = {default}")
        lines.append("")
    return "\n".join(lines)
