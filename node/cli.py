"""The node's command line, derived from `NodeConfig`: one flag per field, built once.

Every field of `NodeConfig` and of its nested sections is a flag: `--<section>-<field>` with `_` as `-`
(`--runtime-frame-timeout-s`, `--discovery-dht-enabled`), booleans also as `--no-...`, lists repeatable;
the field's comment is its help. `SHORT_FLAGS` adds the short names launchers use (`--steps`,
`--replicated`, `--no-dht`, ...). A configuration is built in one pass:

    dataclass defaults < TOML file (`--config FILE`, nested tables as in NodeConfig)
    < environment `PMN_<SECTION>_<FIELD>` (upper case: PMN_RUNTIME_STEPS, PMN_DATA_DIR) < flags

`python -m node ...` (or `python -m node.daemon ...`) runs `main`; `pmn node start` adds the same
flags to its own parser (`add_config_flags(parser, None)`) and starts the node with `start(cfg)`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import io
import json
import os
import sys
import tokenize
import tomllib
import traceback
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from node.config import NodeConfig
from node.errors import NodeError

SHORT_FLAGS: dict[str, tuple[str, ...]] = {
    "num_stages": ("--stages",),
    "optim_lr": ("--lr",),
    "runtime.steps": ("--steps",),
    "web.port": ("--status-port",),
    "runtime.num_microbatches": ("--microbatches",),
    "runtime.microbatch_size": ("--microbatch-size",),
    "runtime.codec": ("--codec",),
    "runtime.replica_averaging": ("--replica-averaging",),
    "runtime.powersgd_rank": ("--powersgd-rank",),
    "runtime.powersgd_bits": ("--powersgd-bits",),
    "runtime.powersgd_iterations": ("--powersgd-iterations",),
    "runtime.powersgd_block_rank": ("--powersgd-block-rank",),
    "runtime.replica_exchange": ("--replica-exchange",),
    "runtime.torch_threads": ("--threads",),
    "execution.precision": ("--precision",),
    "execution.activation_checkpointing": ("--activation-checkpointing",),
    "runtime.schedule": ("--schedule",),
    "runtime.max_staleness": ("--max-staleness",),
    "runtime.async_lookahead": ("--async-lookahead",),
    "runtime.checkpoint_every": ("--checkpoint-every",),
    "runtime.checkpoint_keep": ("--checkpoint-keep",),
    "runtime.abandoned_keep": ("--abandoned-keep",),
    "runtime.eval_every": ("--eval-every",),
    "runtime.eval_batches": ("--eval-batches",),
    "runtime.frame_timeout_s": ("--frame-timeout",),
    "runtime.redial_timeout_s": ("--redial-timeout",),
    "runtime.step_retries": ("--step-retries",),
    "transport.credits": ("--credits",),
    "discovery.dht.enabled": ("--dht",),  # so also --no-dht
    "replicas.enabled": ("--replicated",),
    "replicas.max_inflight": ("--max-inflight",),
    "replicas.replica_timeout_s": ("--replica-timeout",),
    "replicas.ban_base_s": ("--ban-base",),
    "replicas.ban_max_s": ("--ban-max",),
    "replicas.no_replica_timeout_s": ("--no-replica-timeout",),
    "replicas.avg_timeout_s": ("--avg-timeout",),
    "replicas.commit_poll_s": ("--commit-poll",),
    "replicas.keep_steps": ("--keep-steps",),
    "replicas.aggregation": ("--aggregation",),
    "replicas.rebalance_period_s": ("--rebalance-period",),
    "replicas.rebalance_threshold": ("--rebalance-threshold",),
    "replicas.debug_delay_s": ("--debug-delay-s",),
    "chain.rpc_url": ("--rpc-url",),
    "chain.deployment": ("--deployment",),
    "chain.model_id": ("--model-id",),
    "nat.relay_service": ("--relay-service",),  # so also --no-relay-service
    "nat.reachability": ("--reachability",),
    "nat.holepunch": ("--holepunch",),  # so also --no-holepunch
}
"""Short names of some fields' flags (the canonical `--section-field` flag exists too)."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable field of NodeConfig: its dotted path, type and help."""

    path: str  # "runtime.steps"
    type: Any  # int, float, str, bool, list[str]; `X | None` is X with `optional`
    optional: bool  # the field may be None
    help: str  # the field's comment in the source (or metadata["help"])

    @property
    def flags(self) -> tuple[str, ...]:
        """Canonical flag first, then the short ones."""
        return ("--" + self.path.replace(".", "-").replace("_", "-"), *SHORT_FLAGS.get(self.path, ()))

    @property
    def env(self) -> str:
        """Its environment variable."""
        return "PMN_" + self.path.replace(".", "_").upper()


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of dataclass `cls` (with comment-only lines right below it)."""
    lines, _ = inspect.getsourcelines(cls)
    source = inspect.cleandoc("\n" + "".join(lines)) if lines[0].startswith(" ") else "".join(lines)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    code_lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            end = node.end_lineno or node.lineno
            parts = [comments[end]] if end in comments else []
            n = end + 1
            while n in comments and code_lines[n - 1].strip().startswith("#"):
                parts.append(comments[n])
                n += 1
            out[node.target.id] = " ".join(parts)
    return out


def leaves(cls: type = NodeConfig, prefix: str = "") -> Iterator[Leaf]:
    """Every settable field of `cls` and its nested dataclasses, depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from leaves(typ, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        optional = False
        if isinstance(typ, types.UnionType) and type(None) in typing.get_args(typ):
            optional = True
            (typ,) = [t for t in typing.get_args(typ) if t is not type(None)]
        yield Leaf(prefix + f.name, typ, optional, f.metadata.get("help", comments.get(f.name, "")))


def get_path(cfg: Any, path: str) -> Any:
    """The value at a dotted path."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_path(cfg: Any, path: str, value: Any) -> None:
    """Set the value at a dotted path."""
    *parents, name = path.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, name, value)


def coerce(leaf: Leaf, raw: Any, where: str) -> Any:
    """`raw` (TOML value or environment string) as the field's type; ValueError names `where`."""
    if leaf.optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none"))):
        return None
    try:
        if typing.get_origin(leaf.type) is list:
            if isinstance(raw, str):
                raw = [part for part in (p.strip() for p in raw.split(",")) if part]
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise ValueError(raw)
            return list(raw)
        if leaf.type is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return raw.lower() in ("1", "true", "yes", "on")
            raise ValueError(raw)
        if leaf.type is int:
            if isinstance(raw, bool) or isinstance(raw, float):
                raise ValueError(raw)
            return int(raw)
        if leaf.type is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw
    except (TypeError, ValueError):
        name = getattr(leaf.type, "__name__", str(leaf.type))
        raise ValueError(f"{where}: {leaf.path} must be {name}, got {raw!r}") from None


def load_node_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> NodeConfig:
    """NodeConfig from the dataclass defaults, then the TOML file at `path`, then `PMN_*` variables of `env`."""
    cfg = NodeConfig()
    by_path = {leaf.path: leaf for leaf in leaves()}
    if path is not None:
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None

        def flatten(table: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
            for key, value in table.items():
                if isinstance(value, dict) and f"{prefix}{key}" not in by_path:
                    yield from flatten(value, f"{prefix}{key}.")
                else:
                    yield f"{prefix}{key}", value

        for key, raw in flatten(data, ""):
            if key not in by_path:
                raise ValueError(f"{path}: unknown field {key!r}")
            set_path(cfg, key, coerce(by_path[key], raw, str(path)))
    for leaf in by_path.values():
        if env is not None and leaf.env in env:
            set_path(cfg, leaf.path, coerce(leaf, env[leaf.env], leaf.env))
    return cfg


class _ReplaceList(argparse.Action):
    """A repeatable flag whose first use replaces the default list (`--listen A --listen B` = [A, B])."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, [*items, values])


def add_config_flags(parser: argparse.ArgumentParser, defaults: NodeConfig | None,
                     help_overrides: Mapping[str, str] | None = None) -> None:
    """Add one flag per NodeConfig field to `parser` (argument groups per section).

    defaults: the values the flags default to (shown in --help); None = a flag not given leaves its
    field out of the namespace (`flag_values` then lists only the given ones).
    """
    groups: dict[str, Any] = {}
    for leaf in leaves():
        section = leaf.path.rpartition(".")[0]
        if section not in groups:
            doc = inspect.getdoc(type(get_path(NodeConfig(), section))) if section else None
            groups[section] = parser.add_argument_group(section, doc) if section else parser
        kw: dict[str, Any] = {
            "dest": leaf.path, "help": (help_overrides or {}).get(leaf.path, leaf.help),
            "default": argparse.SUPPRESS if defaults is None else get_path(defaults, leaf.path)}
        if leaf.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(leaf.type) is list:
            kw.update(action=_ReplaceList, metavar="ADDR")
        else:
            kw.update(type=leaf.type, metavar=leaf.path.rpartition(".")[2].upper())
        groups[section].add_argument(*leaf.flags, **kw)


def flag_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The NodeConfig paths set in `ns` and their values."""
    return {leaf.path: getattr(ns, leaf.path) for leaf in leaves() if hasattr(ns, leaf.path)}


def apply_flags(cfg: NodeConfig, values: Mapping[str, Any]) -> NodeConfig:
    """A copy of `cfg` with the given dotted paths set."""
    out = copy.deepcopy(cfg)
    for path, value in values.items():
        set_path(out, path, copy.copy(value))
    return out


def build_parser(defaults: NodeConfig | None = None) -> argparse.ArgumentParser:
    """The parser of `python -m node` (flags default to `defaults`, else the dataclass defaults)."""
    p = argparse.ArgumentParser(prog="python -m node", description="Run one pipeline-stage node.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, help="NodeConfig TOML file (PMN_* variables and flags override it)")
    add_config_flags(p, NodeConfig() if defaults is None else defaults)
    return p


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> NodeConfig:
    """NodeConfig from `--config FILE` < `PMN_*` in `env` (default: os.environ) < the flags in `argv`."""
    args = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(args)
    base = load_node_config(known.config, os.environ if env is None else env)
    return apply_flags(base, flag_values(build_parser(base).parse_args(args)))


def report_error(caught: BaseException) -> int:
    """Print one JSON error line on stdout and `error: ...` on stderr; returns exit code 1.

    A one-member exception group (a service's error) is reported as its member; exceptions other
    than NodeError / ValueError are bugs and also print their traceback to stderr.
    """
    exc = caught
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    print(json.dumps({"event": "error", "error": str(exc), "type": type(exc).__name__}), flush=True)
    print(f"error: {exc}", file=sys.stderr)
    if not isinstance(exc, NodeError | ValueError):
        traceback.print_exception(exc, file=sys.stderr)
    return 1


def describe_device(cfg: NodeConfig) -> str:
    """The start-up line naming the node's device, its free memory and precision (ValueError if absent)."""
    from sharding.device import device_info
    from sharding.errors import DeviceError

    try:
        policy = cfg.execution.policy(cfg.device)
    except DeviceError as exc:  # a usage error: one line, no traceback
        raise ValueError(str(exc)) from None
    return f"{device_info(policy.torch_device).line()}; compute {policy.compute_dtype_name}, AdamW {policy.adamw_kwargs()}"


def start(cfg: NodeConfig) -> int:
    """Run a node with `cfg` (chain services when `cfg.chain.rpc_url` is set); errors: one line, exit code 1."""
    from node.daemon import run_node
    from node.services.chain_link import services_for

    try:
        cfg.validate()
        print(describe_device(cfg), file=sys.stderr, flush=True)
        receipts, services = services_for(cfg)
        return run_node(cfg, receipts=receipts, services=services)
    except Exception as caught:  # NodeError, ValueError, chain and protocol errors: one line, no traceback
        return report_error(caught)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit code 0 on success (128 + signal when stopped), 1 with a one-line error otherwise."""
    try:
        cfg = parse_config(argv)
    except ValueError as caught:  # a bad config file or PMN_* variable (usage errors exit 2 in argparse)
        return report_error(caught)
    return start(cfg)


def exit_now(code: int) -> None:
    """Flush and leave without interpreter finalization (several seconds with torch + py-libp2p loaded;
    every file and stream is already closed when main returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
