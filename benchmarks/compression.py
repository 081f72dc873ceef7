"""Compression benchmark: what the subspace boundary saves, against the fairest baselines.

Every boundary crossing travels inside real `/pmn/act/1.0.0` frames (node.wire.frames: header, token
window, codec payload, a 65-byte receipt signature), is parsed back and digest-checked, and is
acknowledged by a real ACK frame (digest + 65-byte countersignature) followed by a CREDIT frame, in
both directions. Bytes per token are those frame bytes ÷ (tokens × boundaries), so ids, headers,
signatures and acks are all counted.

Token windows: a node started from a spec with a [data] section reads the (step, microbatch) window from its
own copy of the dataset, so activation frames travel without it (FrameSpec.local_windows; the digest still
covers it). That is the headline (`local_windows: true`); `--windows-on-wire` makes the window-carrying
frames of the byte-level corpus the headline instead. Either way the other mode's bytes and compression are
reported too (keys ending in `_windows_on_wire` or `_local_windows`), and the bf16 and fp32 baselines are
always framed the same way as the arm they are compared with.

Arms, all with the same stage split, tokens and data:
  dense     plain pre-norm GPT (fp32 boundaries): the architecture baseline
  control   the subspace architecture with k = d_model (frozen embedding + post-norms, no compression)
  subspace  the subspace architecture with k = --k, bf16 z on the wire
Both subspace-architecture arms use `--post-norm` (default scalar: RMSNorm times one learned gain per
sublayer, which measured best; the models' own default stays weightless, so spec hashes are unchanged).
Wire baselines (bytes only): the plain GPT with the `bf16` codec (main baseline) and the `dense` fp32 codec.

Method:
  1. Learning rate per arm, on a separate probe: each arm sweeps the grid for `probe_frac` of the
     budget on a different data seed, scored on validation windows the final evaluation never uses.
     A best rate at the edge of the grid prints a warning.
  2. Main runs at the probe's rate: control and subspace with every seed in `seeds`, dense with the
     first seed. Validation loss on `val_batches * batch_size` windows (>= 64k tokens in the full run),
     and a loss curve on a smaller fixed subset at `curve_points` checkpoints.
Reported:
  compression_vs_bf16 (main figure), compression_vs_fp32;
  loss_ratio_control = subspace ÷ control validation loss (mean over seeds, with min and max);
  token_multiplier = tokens the subspace run needs to reach the control's final curve loss ÷ the
    control's tokens (interpolated between checkpoints; extrapolated in log-tokens past the end, flagged);
  loss_ratio_dense = subspace ÷ dense: the architecture effect, not compression.
`--variants 'k=1;param=coordinates;free=1;norm=none'` trains more compressed arms side by side in the same run,
each overriding the main arm's k, parametrisation, free tail or post-sublayer norm (weightless, scalar, none);
each is compared with a control of its own free tail and norm (reported under the JSON key `variants`, with the
main arm's keys). Runs execute in `--workers`
processes with one torch thread each. Prints a table; the last line is JSON.

    python benchmarks/compression.py --quick      # < 60 s, machinery check only
    python benchmarks/compression.py              # the full run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.wire import frames  # noqa: E402
from sharding.codecs import Codec, get_codec, token_id_bytes  # noqa: E402
from sharding.config import ModelConfig  # noqa: E402
from sharding.data import Corpus, load_corpus  # noqa: E402
from sharding.pipeline import LocalPipeline  # noqa: E402
from sharding.train import OptimConfig  # noqa: E402

SIGNATURE_BYTES = 65  # secp256k1 EIP-712 receipt signature (sender) and countersignature (receiver)
TODAY_TOKEN_BUDGET = 300 * 8 * 64  # the previous benchmark's tokens per run (the 5x reference)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark's shape and budget."""

    d_model: int = 256  # model width
    n_layers: int = 6  # transformer blocks (every one but the last `free_tail_layers` constrained)
    n_heads: int = 4  # attention heads (head size 64)
    mlp_ratio: int = 4  # MLP width multiple
    seq_len: int = 64  # tokens per sequence
    batch_size: int = 16  # sequences per optimizer step (one microbatch, one frame per boundary)
    steps: int = 750  # optimizer steps per main run: 750 * 16 * 64 = 768k tokens = 5x the old budget
    stages: int = 3  # pipeline stages (2 boundaries)
    k: int = 2  # subspace rank of the compressed arm (d_model / 128)
    free_tail_layers: int = 2  # last blocks left unconstrained (node0: 2)
    lrs: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)  # learning-rate grid of the probe, per arm
    probe_frac: float = 0.2  # probe runs train for this fraction of `steps`
    probe_data_seed: int = 1000  # data seed of the probe (main runs use their model seed)
    probe_eval_seed: int = 777  # validation-window seed of the probe's score (final eval uses 1234)
    warmup_frac: float = 0.05  # warm-up steps as a fraction of steps (cosine decay to 10 % after)
    seeds: tuple[int, ...] = (0, 1)  # model + data seeds of the control and subspace main runs
    val_batches: int = 64  # final validation: val_batches * batch_size windows of seq_len tokens
    curve_points: int = 10  # validation checkpoints along each main run (for token_multiplier)
    curve_batches: int = 8  # windows (x batch_size) of the fixed curve subset
    int8: bool = False  # also run the plain GPT with int8 boundaries (one more main run)
    param: str = "projected"  # ModelConfig.subspace_param of the subspace arm ("coordinates": the constrained
    # stream writers trained in k coordinates, as Pluralis's reference code does); controls hold plain weights
    post_norm: str = "scalar"  # ModelConfig.post_norm of the subspace arm and its control: the full run measured
    # scalar best (loss ratio 1.021, token multiplier 1.05, against 1.041 and 1.18 weightless, 1.060 and 1.33 none)
    local_windows: bool = True  # activation frames without the token window, as nodes run a spec with a [data]
    # section (every stage reads the window from its own copy; the digest still covers it); False: the window on
    # the wire, as with the byte-level corpus. Both figures are reported; this one is the headline.


QUICK = BenchConfig(
    d_model=128, n_layers=3, n_heads=2, seq_len=32, batch_size=4, steps=12, stages=2, k=2,
    free_tail_layers=1, lrs=(1e-3, 2e-3), probe_frac=0.5, seeds=(0,), val_batches=2, curve_points=3,
    curve_batches=1,
)


@dataclass(frozen=True)
class Arm:
    """One model variant the benchmark trains: its probe picks its learning rate, its main runs use every seed."""

    name: str  # row label: dense, control, subspace, or a variant's label (k=1, param=coordinates, ...)
    rank: int | None  # subspace rank k (d_model for a control), None for the plain GPT
    codec: str  # boundary codec of its runs: dense (fp32) or subspace
    free_tail_layers: int  # last blocks left unconstrained (0 for the plain GPT)
    param: str = "projected"  # ModelConfig.subspace_param of a subspace or control arm
    post_norm: str = "weightless"  # ModelConfig.post_norm of a subspace or control arm
    control: str = ""  # name of the control arm its loss is compared with ('' for controls and the plain GPT)

    @property
    def compressed(self) -> bool:
        return bool(self.control)


def model_config(b: BenchConfig, arm: Arm, seed: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        seq_len=b.seq_len,
        d_model=b.d_model,
        n_layers=b.n_layers,
        n_heads=b.n_heads,
        mlp_ratio=b.mlp_ratio,
        subspace_rank=arm.rank,
        free_tail_layers=arm.free_tail_layers,
        subspace_param=arm.param,
        post_norm=arm.post_norm,
        seed=seed,
    ).validate()


def arms_of(b: BenchConfig, variants: tuple[dict[str, Any], ...] = ()) -> dict[str, Arm]:
    """The plain GPT, the main subspace arm, each variant (k, param, free, norm overriding the main arm's), and one
    control (k = d_model, projected) per distinct (free_tail_layers, post_norm) among them, so each compressed arm
    is compared with the same architecture uncompressed."""
    main = Arm("subspace", b.k, "subspace", b.free_tail_layers, b.param, b.post_norm, control="control")
    out = {"dense": Arm("dense", None, "dense", 0),
           "control": Arm("control", b.d_model, "dense", b.free_tail_layers, post_norm=b.post_norm)}
    out["subspace"] = main
    for v in variants:
        free = int(v.get("free", main.free_tail_layers))
        norm = str(v.get("norm", main.post_norm))
        control = "control" + "".join(f" {key}={val}" for key, val, base in (
            ("free", free, main.free_tail_layers), ("norm", norm, main.post_norm)) if val != base)
        if control not in out:
            out[control] = Arm(control, b.d_model, "dense", free, post_norm=norm)
        arm = Arm("", int(v["k"]) if "k" in v else b.k, "subspace", free, str(v.get("param", main.param)), norm,
                  control)
        label = ",".join(f"{key}={val}" for key, val in (("k", arm.rank), ("param", arm.param), ("free", free))) + (
            f",norm={norm}" if norm != main.post_norm else "")
        out[label] = dataclasses.replace(arm, name=label)
    return out


def parse_variants(text: str) -> tuple[dict[str, Any], ...]:
    """'k=1;k=2,param=coordinates;free=1;norm=none' -> one dict per variant (keys k, param, free, norm)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        v: dict[str, Any] = {}
        for pair in item.split(","):
            key, _, val = pair.partition("=")
            key = key.strip()
            if key not in ("k", "param", "free", "norm") or not val:
                raise SystemExit(f"--variants: {pair!r} in {item!r}: use k=INT, param=projected|coordinates, free=INT, "
                                 "norm=weightless|scalar|none")
            v[key] = val.strip() if key in ("param", "norm") else int(val)
        out.append(v)
    return tuple(out)


class FramedCodec(Codec):
    """Wraps a codec so every payload crosses as a real data frame, parsed back, acked and credited.

    Counts every byte of the DATA frame (header, window, payload, signature) and of the receiver's ACK
    (header, digest, countersignature) and CREDIT frames. Decoding goes through `frames.decode_frame`,
    which checks the header and the BLAKE3 digest, so what the next stage sees is what the wire carried.
    """

    def __init__(self, inner: Codec, spec_hash: bytes, local_windows: bool = False) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.local_windows = local_windows  # activation frames leave the window out of the body (digest covers it)
        self.name = inner.name
        self.spec_hash = spec_hash
        self.frame_bytes = 0  # bytes of every frame, both directions
        self.frames = 0  # data frames sent
        self.codec_id = frames.CODEC_IDS[inner.name]
        self._sig = bytes(range(SIGNATURE_BYTES))
        self._max = 1 << 30

    @property
    def bytes_per_token(self) -> int:
        return self.inner.bytes_per_token

    def _cross(self, kind: frames.Kind, payload: bytes, ids: torch.Tensor, window: bool) -> bytes:
        b, t = ids.shape
        win = b""
        if window:  # the forward frame carries the (B, T+1) window: ids plus one target per row
            width = token_id_bytes(self.config)
            win = b"\x00" * (width * b * (t + 1))
        local = self.local_windows and bool(win)
        raw = frames.encode_frame(
            kind, self.spec_hash, 0, 0, self.frames, payload=payload, window=win, signature=self._sig,
            codec=self.codec_id, dtype=frames.CODEC_DTYPES[self.codec_id], shape=(b, t, self.config.d_model),
            window_in_body=not local,
        )
        fr = frames.decode_frame(raw, self._max, local_window=win if local else None)
        ack = frames.encode_frame(frames.Kind.ACK, self.spec_hash, 1, 0, self.frames,
                                  payload=fr.header.digest + self._sig)
        credit = frames.encode_frame(frames.Kind.CREDIT, self.spec_hash, 1, 0, 1)
        self.frame_bytes += len(raw) + len(ack) + len(credit)
        self.frames += 1
        return fr.payload

    def encode_activation(self, h: torch.Tensor, ids: torch.Tensor) -> bytes:
        return self._cross(frames.Kind.ACTIVATION, self.inner.encode_activation(h, ids), ids, window=True)

    def decode_activation(self, payload: bytes, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        return self.inner.decode_activation(payload, ids, device)

    def encode_gradient(self, g: torch.Tensor, ids: torch.Tensor) -> bytes:
        return self._cross(frames.Kind.GRADIENT, self.inner.encode_gradient(g, ids), ids, window=False)

    def decode_gradient(self, payload: bytes, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        return self.inner.decode_gradient(payload, ids, device)


def framed_pipeline(b: BenchConfig, cfg: ModelConfig, codec: str, optim: OptimConfig) -> tuple[LocalPipeline, FramedCodec]:
    wrapped = FramedCodec(get_codec(codec, cfg), cfg.spec_hash(), b.local_windows)
    return LocalPipeline(cfg, b.stages, wrapped, optim), wrapped


def wire_bytes_per_token(b: BenchConfig, cfg: ModelConfig, codec: str, corpus: Corpus) -> float:
    """Frame bytes per token per boundary (both directions) of one training step with `codec` (windows as
    `b.local_windows` says)."""
    pipe, wire = framed_pipeline(b, cfg, codec, OptimConfig(lr=1e-3, warmup_steps=1))
    pipe.train_step(0, corpus, 1, b.batch_size)
    return wire.frame_bytes / (b.batch_size * b.seq_len * (b.stages - 1))


def _optim(b: BenchConfig, steps: int, lr: float, data_seed: int) -> OptimConfig:
    return OptimConfig(lr=lr, warmup_steps=max(1, int(steps * b.warmup_frac)), decay_steps=steps,
                       data_seed=data_seed)


def train_run(b: BenchConfig, arm: Arm, lr: float, seed: int, probe: bool, corpus: Corpus) -> dict[str, Any]:
    """One run: a probe (short, separate data, probe score) or a main run (curve + final validation)."""
    steps = max(2, int(b.steps * b.probe_frac)) if probe else b.steps
    data_seed = b.probe_data_seed + seed if probe else seed
    cfg = model_config(b, arm, seed)
    pipe, wire = framed_pipeline(b, cfg, arm.codec, _optim(b, steps, lr, data_seed))
    tokens_per_step = b.batch_size * b.seq_len
    marks = {round(steps * (i + 1) / b.curve_points) for i in range(b.curve_points)} if not probe else set()
    curve: list[tuple[int, float]] = []
    t0 = time.time()
    losses = []
    train_bytes = 0  # frame bytes of training steps only (evaluation forwards also cross the wire)
    for s in range(steps):
        before = wire.frame_bytes
        losses.append(pipe.train_step(s, corpus, 1, b.batch_size))
        train_bytes += wire.frame_bytes - before
        if s + 1 in marks:
            curve.append(((s + 1) * tokens_per_step, pipe.evaluate(corpus, b.curve_batches, b.batch_size, seed=4321)))
    if probe:
        val = pipe.evaluate(corpus, max(1, b.val_batches // 4), b.batch_size, seed=b.probe_eval_seed)
    else:
        val = pipe.evaluate(corpus, b.val_batches, b.batch_size)
    return {
        "arm": arm.name, "codec": arm.codec, "k": arm.rank, "lr": lr, "seed": seed, "probe": probe, "steps": steps,
        "tokens": steps * tokens_per_step, "val_loss": val, "curve": curve,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "measured_bytes_per_token": train_bytes / (steps * tokens_per_step * (b.stages - 1)),
        "seconds": time.time() - t0,
    }


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> tuple[float, bool]:
    """First token count where the (piecewise linear) curve reaches `target`. When it never does, extrapolated
    from a least-squares line of loss against log-tokens through the last half of the curve (at least two
    points: a single noisy pair would make the slope, and the estimate, arbitrary). Returns (tokens,
    extrapolated); inf when the fitted loss is not falling."""
    prev: tuple[int, float] | None = None
    for tok, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tok), False
            frac = (prev[1] - target) / (prev[1] - loss)
            return prev[0] + frac * (tok - prev[0]), False
        prev = (tok, loss)
    tail = curve[-max(2, len(curve) // 2):]
    xs = [math.log(t) for t, _ in tail]
    ys = [loss for _, loss in tail]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    if slope >= 0:  # loss per e-fold of tokens (< 0 while learning)
        return math.inf, True
    last_fit = my + slope * (xs[-1] - mx)  # the line at the last point: extrapolate from the fit, not the noise
    return math.exp(xs[-1] + (target - last_fit) / slope), True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budget (< 60 s): checks the machinery only")
    ap.add_argument("--steps", type=int, help="optimizer steps per main run")
    ap.add_argument("--k", type=int, help="subspace rank")
    ap.add_argument("--d-model", type=int, help="model width")
    ap.add_argument("--heads", type=int, help="attention heads")
    ap.add_argument("--lrs", type=str, help="comma-separated learning-rate grid of the probe")
    ap.add_argument("--seeds", type=str, help="comma-separated seeds of the main runs")
    ap.add_argument("--layers", type=int, help="n_layers")
    ap.add_argument("--stages", type=int, help="pipeline stages")
    ap.add_argument("--free-tail-layers", type=int, help="unconstrained last blocks")
    ap.add_argument("--batch", type=int, help="sequences per step")
    ap.add_argument("--seq", type=int, help="sequence length")
    ap.add_argument("--int8", action="store_true", help="also run the plain GPT with int8 boundaries")
    ap.add_argument("--param", choices=("projected", "coordinates"),
                    help="subspace_param of the subspace arm (default projected; the control is always plain weights)")
    ap.add_argument("--post-norm", choices=("weightless", "scalar", "none"),
                    help="post_norm of the subspace arm and its control (default scalar)")
    ap.add_argument("--variants", type=str,
                    help="more compressed arms side by side, ';'-separated, each overriding the main arm's k, param "
                         "or free tail layers: e.g. 'k=1;param=coordinates;free=1' (a changed free tail gets its own "
                         "control)")
    ap.add_argument("--windows-on-wire", action="store_true",
                    help="headline with the token window in every activation frame (as with the byte-level corpus) "
                         "instead of read by each stage from the spec's dataset")
    ap.add_argument("--workers", type=int, default=2, help="parallel run processes (one torch thread each)")
    args = ap.parse_args(argv)
    b = QUICK if args.quick else BenchConfig()
    overrides = {
        "steps": args.steps, "k": args.k, "d_model": args.d_model, "n_heads": args.heads, "n_layers": args.layers,
        "stages": args.stages, "free_tail_layers": args.free_tail_layers, "batch_size": args.batch,
        "seq_len": args.seq, "param": args.param, "post_norm": args.post_norm,
    }
    b = dataclasses.replace(b, **{k: v for k, v in overrides.items() if v is not None})
    if args.lrs:
        b = dataclasses.replace(b, lrs=tuple(float(x) for x in args.lrs.split(",")))
    if args.seeds:
        b = dataclasses.replace(b, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.int8:
        b = dataclasses.replace(b, int8=True)
    if args.windows_on_wire:
        b = dataclasses.replace(b, local_windows=False)
    corpus = load_corpus()
    t0 = time.time()
    arms = arms_of(b, parse_variants(args.variants or ""))
    seed0 = b.seeds[0]
    bytes_bf16 = wire_bytes_per_token(b, model_config(b, arms["dense"], seed0), "bf16", corpus)
    bytes_fp32 = wire_bytes_per_token(b, model_config(b, arms["dense"], seed0), "dense", corpus)
    compressed = [a for a in arms.values() if a.compressed]
    bytes_of = {a.name: wire_bytes_per_token(b, model_config(b, a, seed0), "subspace", corpus) for a in compressed}
    other = dataclasses.replace(b, local_windows=not b.local_windows)  # the other window mode: bytes only
    other_bf16 = wire_bytes_per_token(other, model_config(b, arms["dense"], seed0), "bf16", corpus)
    other_of = {a.name: wire_bytes_per_token(other, model_config(b, a, seed0), "subspace", corpus) for a in compressed}
    other_key = "windows_on_wire" if b.local_windows else "local_windows"

    with _executor(args.workers) as pool:
        probes = {(name, lr): pool.submit(_one, (b, arm, lr, seed0, True)) for name, arm in arms.items() for lr in b.lrs}
        best_lr: dict[str, float] = {}
        warnings: list[str] = []
        for name in arms:
            scored = [(probes[(name, lr)].result()["val_loss"], lr) for lr in b.lrs]
            best_lr[name] = min(scored)[1]
            if len(b.lrs) > 1 and best_lr[name] in (min(b.lrs), max(b.lrs)):
                warnings.append(f"{name}: best probe lr {best_lr[name]:g} sits at the edge of the grid {list(b.lrs)}")
        mains: list[Future[dict]] = []
        for name, arm in arms.items():
            seeds = b.seeds if name != "dense" else (seed0,)
            mains += [pool.submit(_one, (b, arm, best_lr[name], s, False)) for s in seeds]
        if b.int8:
            mains.append(pool.submit(_one, (b, dataclasses.replace(arms["dense"], name="int8", codec="int8"),
                                            best_lr["dense"], seed0, False)))
        results = [f.result() for f in mains]
        probe_rows = [f.result() for f in probes.values()]

    by_seed = {(r["arm"], r["seed"]): r for r in results}
    dense = by_seed[("dense", seed0)]
    summaries = {a.name: _summary(b, a, by_seed, bytes_of[a.name], bytes_bf16, bytes_fp32, dense) for a in compressed}
    for name, v in summaries.items():  # the same arm's compression in the other window mode
        v[f"frame_bytes_per_token_{other_key}"] = other_of[name]
        v[f"compression_vs_bf16_{other_key}"] = other_bf16 / other_of[name]
    main_sum = summaries["subspace"]
    int8 = by_seed.get(("int8", seed0))
    val_tokens = b.val_batches * b.batch_size * b.seq_len
    tokens = b.steps * b.batch_size * b.seq_len

    print(f"d_model={b.d_model} layers={b.n_layers} heads={b.n_heads} stages={b.stages} k={b.k} "
          f"free_tail={b.free_tail_layers} param={b.param} steps={b.steps} tokens/run={tokens} "
          f"({tokens / TODAY_TOKEN_BUDGET:.1f}x the old budget) val tokens={val_tokens} seeds={list(b.seeds)} "
          f"corpus={corpus.name} ({corpus.num_files} files)")
    mode = "windows read locally" if b.local_windows else "windows on the wire"
    print(f"frame bytes/token/boundary, both directions ({mode}): fp32 {bytes_fp32:.2f}  bf16 {bytes_bf16:.2f}  "
          f"subspace {bytes_of['subspace']:.2f}; {other_key.replace('_', ' ')}: bf16 {other_bf16:.2f}  "
          f"subspace {other_of['subspace']:.2f} ({other_bf16 / other_of['subspace']:.1f}x)")
    print("probe (lr per arm, separate data and validation windows):")
    for r in sorted(probe_rows, key=lambda r: (r["arm"], r["lr"])):
        mark = " <- best" if best_lr[r["arm"]] == r["lr"] else ""
        print(f"  {r['arm']:<30}lr {r['lr']:.1e}  probe val {r['val_loss']:.4f}  ({r['steps']} steps){mark}")
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"{'run':<30}{'seed':>5}{'lr':>9}{'B/token':>9}{'val loss':>10}{'/control':>9}{'/dense':>8}"
          f"{'train':>8}{'sec':>7}")
    for r in results:
        of = arms.get(r["arm"])
        ctrl = by_seed.get((of.control, r["seed"])) if of and of.control else None
        print(f"{r['arm']:<30}{r['seed']:>5}{r['lr']:>9.1e}{r['measured_bytes_per_token']:>9.2f}{r['val_loss']:>10.4f}"
              f"{(r['val_loss'] / ctrl['val_loss']) if ctrl else 1.0:>9.4f}{r['val_loss'] / dense['val_loss']:>8.4f}"
              f"{r['train_loss_last10']:>8.4f}{r['seconds']:>7.0f}")
    print(f"{'compressed arm':<30}{'vs bf16':>8}{'vs fp32':>8}{'loss/control (range)':>26}{'token mult':>11}"
          f"{'/dense':>8}")
    for name, v in summaries.items():
        rng = f"{v['loss_ratio_control']:.4f} [{v['loss_ratio_control_min']:.4f}, {v['loss_ratio_control_max']:.4f}]"
        print(f"{name:<30}{v['compression_vs_bf16']:>7.1f}x{v['compression_vs_fp32']:>7.1f}x{rng:>26}"
              f"{v['token_multiplier']:>10.3f}{'*' if v['token_multiplier_extrapolated'] else ' '}"
              f"{v['loss_ratio_dense']:>8.4f}")
    print("(* extrapolated past the end of the run; /dense is the architecture effect, not compression)")
    result = {
        "mode": "quick" if args.quick else "full",
        "d_model": b.d_model,
        "n_layers": b.n_layers,
        "stages": b.stages,
        "k": b.k,
        "free_tail_layers": b.free_tail_layers,
        "subspace_param": b.param,
        "post_norm": b.post_norm,
        "steps": b.steps,
        "tokens_per_run": tokens,
        "token_budget_multiple": tokens / TODAY_TOKEN_BUDGET,
        "seeds": list(b.seeds),
        "val_tokens": val_tokens,
        "codec": "subspace",
        "local_windows": b.local_windows,  # True: activation frames carry no token window (a spec with [data])
        "compression_vs_bf16": main_sum["compression_vs_bf16"],
        f"compression_vs_bf16_{other_key}": main_sum[f"compression_vs_bf16_{other_key}"],
        f"frame_bytes_per_token_bf16_{other_key}": other_bf16,
        f"frame_bytes_per_token_{other_key}": other_of["subspace"],
        "compression_vs_fp32": main_sum["compression_vs_fp32"],
        "frame_bytes_per_token_bf16": bytes_bf16,
        "frame_bytes_per_token_fp32": bytes_fp32,
        "frame_bytes_per_token": bytes_of["subspace"],
        "loss_ratio_control": main_sum["loss_ratio_control"],
        "loss_ratio_control_min": main_sum["loss_ratio_control_min"],
        "loss_ratio_control_max": main_sum["loss_ratio_control_max"],
        "token_multiplier": main_sum["token_multiplier"],
        "token_multiplier_per_seed": main_sum["token_multiplier_per_seed"],
        "token_multiplier_extrapolated": main_sum["token_multiplier_extrapolated"],
        "loss_ratio_dense": main_sum["loss_ratio_dense"],
        "lr_warnings": warnings,
        # the other compressed arms (--variants), each against its own control, same keys as above
        "variants": [v for name, v in summaries.items() if name != "subspace"],
        # earlier keys, kept: `compression` is against fp32 frames, `loss_ratio` is the architecture effect
        "bytes_per_token_dense": bytes_fp32,
        "bytes_per_token": bytes_of["subspace"],
        "compression": main_sum["compression_vs_fp32"],
        "dense_lr": best_lr["dense"],
        "lr": best_lr["subspace"],
        "control_lr": best_lr["control"],
        "lr_grid": list(b.lrs),
        "val_loss_dense": dense["val_loss"],
        "val_loss": main_sum["val_loss"],
        "loss_ratio": main_sum["loss_ratio_dense"],
        "val_loss_control": statistics.fmean(by_seed[("control", s)]["val_loss"] for s in b.seeds),
        "bytes_per_token_int8": int8["measured_bytes_per_token"] if int8 else None,
        "val_loss_int8": int8["val_loss"] if int8 else None,
        "seconds": time.time() - t0,
        # every main run: arm, seed, lr, validation loss and its curve [(tokens, loss)], to recompute the above
        "runs": [{key: r[key] for key in ("arm", "seed", "lr", "val_loss", "curve")} for r in results],
    }
    print(json.dumps(result))
    return result


def _summary(b: BenchConfig, arm: Arm, by_seed: dict[tuple[str, int], dict], frame_bytes: float, bytes_bf16: float,
             bytes_fp32: float, dense: dict) -> dict[str, Any]:
    """A compressed arm against its control: compression from frame bytes, loss ratio and token multiplier per seed."""
    ratios, multipliers, extrapolated = [], [], False
    for s in b.seeds:
        ctrl, sub = by_seed[(arm.control, s)], by_seed[(arm.name, s)]
        ratios.append(sub["val_loss"] / ctrl["val_loss"])
        reach, extra = tokens_to_reach(sub["curve"], ctrl["curve"][-1][1])
        multipliers.append(reach / ctrl["curve"][-1][0])
        extrapolated |= extra
    first = by_seed[(arm.name, b.seeds[0])]
    return {
        "arm": arm.name, "k": arm.rank, "subspace_param": arm.param, "post_norm": arm.post_norm,
        "free_tail_layers": arm.free_tail_layers,
        "lr": first["lr"], "frame_bytes_per_token": frame_bytes,
        "compression_vs_bf16": bytes_bf16 / frame_bytes, "compression_vs_fp32": bytes_fp32 / frame_bytes,
        "loss_ratio_control": statistics.fmean(ratios), "loss_ratio_control_min": min(ratios),
        "loss_ratio_control_max": max(ratios), "token_multiplier": statistics.fmean(multipliers),
        "token_multiplier_per_seed": multipliers, "token_multiplier_extrapolated": extrapolated,
        "loss_ratio_dense": first["val_loss"] / dense["val_loss"],
        "val_loss": statistics.fmean(by_seed[(arm.name, s)]["val_loss"] for s in b.seeds),
        "control": arm.control,
        "val_loss_control": statistics.fmean(by_seed[(arm.control, s)]["val_loss"] for s in b.seeds),
    }


def _worker_init() -> None:
    torch.set_num_threads(1)


_CORPUS: list[Corpus] = []  # the corpus, read once per worker process


def _one(args: tuple[BenchConfig, Arm, float, int, bool]) -> dict:
    b, arm, lr, seed, probe = args
    if not _CORPUS:
        _CORPUS.append(load_corpus())
    return train_run(b, arm, lr, seed, probe, _CORPUS[0])


class _InlineExecutor:
    """`submit` runs the task at once in this process (workers <= 1)."""

    def __enter__(self) -> _InlineExecutor:
        _worker_init()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[[Any], dict], arg: Any) -> Future[dict]:
        fut: Future[dict] = Future()
        fut.set_result(fn(arg))
        return fut


def _executor(workers: int) -> ProcessPoolExecutor | _InlineExecutor:
    """Runs tasks in `workers` spawned processes (one torch thread each), or inline for workers <= 1."""
    if workers <= 1:
        return _InlineExecutor()
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)


if __name__ == "__main__":
    main()
