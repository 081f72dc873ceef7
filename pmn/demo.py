"""`pmn demo`: the whole loop on one machine, with real components.

An in-process EVM (or `--chain-url`) gets the contracts; a researcher proposes a model; node processes
(one per stage, libp2p on 127.0.0.1) register with stake and train it, signing a receipt for every hop
that the neighbour countersigns; attesters build each epoch's Merkle root from the co-signed receipts
and submit it with a validator quorum, and spot-check a sample of hops at the model's audit rate (state
and inputs fetched from the nodes over libp2p, re-executed on CPU; a failure becomes a fraud verdict);
after the challenge window each node claims its leaf and is minted shares; an inference client pays the fee and gets text generated through the stage peers,
which check the payment on chain; holders claim their revenue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from contracts.chain import advance_time, connect, disconnect, is_embedded, test_accounts
from contracts.client import ProtocolContracts
from contracts.deploy import Deployment, deploy_all
from contracts.embedded import serve_embedded
from node.net.identity import load_or_create_identity
from node.observability.status import node_status, read_progress
from node.observability.web.app import make_app
from node.observability.web.server import PageThread
from node.observability.web.snapshot import node_part, page
from node.services.audit import attester_role, hop_id, spot_check, submit_frauds
from node.services.inference import Sampling, generate, head_stream_opener
from node.testing.swarm import NodeProcess, launch_replicas, launch_swarm, stop_nodes
from pmn.cmd_data import local_bpe_data
from pmn.errors import CLIError
from pmn.spec import ModelProposal, ProposalTerms, TrainingRecipe
from protocol.accounting import accounting_function_hash
from protocol.audit_sampling import attester_stage
from protocol.epoch import EpochContext, build_epoch
from protocol.errors import OutboxError
from protocol.outbox import ChainOutbox, OutboxConfig
from protocol.receipts import Domain, SignedReceipt, StaticKeyRegistry
from protocol.settlement import attest, queue_claims, queue_epoch
from protocol.spotcheck import FraudEvidence, SpotCheckConfig
from protocol.store import ReceiptStore, StoreConfig
from sharding import param_count
from sharding.config import PRESETS
from sharding.dataset import DataSpec, manifest_hash, prepare, read_documents, tokenizer_of
from sharding.partition import partition
from sharding.train import OptimConfig


@dataclass
class DemoConfig:
    """Everything the demo does, small enough for a 2-core machine in well under 5 minutes."""

    preset: str = "tiny-subspace"  # sharding preset of the proposed model
    stages: int = 3  # pipeline stages
    replicas: int = 1  # node processes per stage, each its own operator; above 1 the stages are replicated (below)
    replica_averaging: str = "powersgd"  # replicated: what a stage's replicas exchange (dense, dense-bf16, powersgd)
    powersgd_rank: int = 4  # replicated: rank of the PowerSGD contributions
    powersgd_bits: int = 4  # replicated: their factors' width (16 bf16, 8 int8, 4 int4)
    replica_schedule: str = "async"  # replicated: pipeline schedule (async: later steps run while one is exchanged)
    max_staleness: int = 1  # replicated, async: steps a gradient may lag the weights it updates
    replica_max_inflight: int = 4  # replicated: microbatches a sender may keep at one downstream replica (the node's
    # replicas.max_inflight; 1 spreads a step's microbatches over every replica)
    codec: str = "subspace"  # boundary codec (subspace: only z and token ids cross)
    steps: int = 300  # global training steps (enough for the byte-level model to write Python-looking text)
    epoch_length: int = 150  # steps per accounting epoch (so steps / epoch_length epochs settle)
    microbatches: int = 2  # microbatches per step
    microbatch_size: int = 8  # sequences per microbatch
    lr: float = 3e-3  # AdamW peak learning rate
    eval_every: int = 25  # the swarm evaluates on the validation split after every this many steps (0 = never)
    eval_batches: int = 4  # validation microbatches per evaluation (a fixed set)
    threads_per_node: int = 1  # torch threads per node process
    device: str = "auto"  # compute device of the node processes (auto: first CUDA device, else MPS, else CPU)
    validators: int = 2  # attester accounts (validator role on chain)
    quorum: int = 2  # attester signatures required per epoch root
    challenge_window_s: int = 600  # seconds a root can be challenged (chain time is advanced past it)
    audit_rate: float = 0.02  # published spot-check rate of the model terms (of 1200 hops per epoch)
    inference_fee_wei: int = 10**16  # fee per inference request
    inference_requests: int = 2  # paid requests the client sends
    prompt: str = "def "  # inference prompt
    max_new_tokens: int = 48  # tokens generated per request
    sample_temperature: float = 0.5  # sampling temperature of the answer (0 = greedy)
    sample_top_k: int = 10  # the answer's tokens are drawn among the k most likely (0 = all)
    sample_seed: int = 0  # seed of the draw (request i uses sample_seed + i)
    data_source: str = "stdlib"  # documents of the proposed [data] section (sharding.dataset.read_documents)
    tokenizer: str = "bpe"  # "bpe": trained here at start from data_source; "byte": byte-level ids
    bpe_vocab_size: int = 512  # vocabulary of that BPE (the model's vocab_size)
    data_max_mb: int = 1  # [data] max_mb: MiB of documents tokenized and trained on (keeps the start fast)
    node_ready_timeout_s: float = 90.0  # time for a node process to print its ready line
    discovery_timeout_s: float = 60.0  # how long a node looks for its neighbour stages (slow starts on a busy machine)
    train_timeout_s: float = 600.0  # time for the swarm to finish training
    inference_timeout_s: float = 60.0  # time for one inference request
    poll_s: float = 0.25  # how often the live display is refreshed
    stake_funding_wei: int = 10**18  # ETH sent to each node key for stake and gas
    status_host: str = "127.0.0.1"  # interface of the demo's status page (every stage on one page)
    status_port: int = 0  # port of the demo's status page (0 = any free port)
    status_poll_s: float = 1.0  # how often the open page asks for a new snapshot
    outbox_retry_interval_s: float = 0.5  # chain writes (roots, claims, fees) wait this long after an RPC failure
    outbox_max_backoff_s: float = 5.0  # cap on that wait while the RPC stays down (doubled per failed pass)
    outbox_call_timeout_s: float = 5.0  # HTTP timeout of one JSON-RPC request of the chain outbox
    chain_outage_timeout_s: float = 600.0  # longest the settlement waits for the chain to come back (writes stay queued)


def _fmt_units(n: int) -> str:
    return f"{n / 1e9:.2f} GFLOP" if n >= 1e7 else str(n)


class Demo:
    """One demo run; `run()` returns the summary dict."""

    def __init__(self, cfg: DemoConfig, root: Path, chain_url: str | None, console: Console | None,
                 keep: bool = False) -> None:
        self.cfg = cfg
        self.root = root
        # keep: root stays after the demo with the deployment file, receipts and keystores, and stage 0's
        # revenue is left for the holder's own `pmn claim` (see `holder_commands`)
        self.keep = keep
        self.keep_chain = False  # leave an embedded chain running after `run` (`close_chain` stops it)
        self.chain_url = chain_url
        self.console = console
        self.nodes: list[NodeProcess] = []
        self.stop_chain: Any = None
        self.spot_checks = {"checked": 0, "failed": 0}  # hops re-executed by the attesters, and failures
        self.evidence: list[FraudEvidence] = []  # failed spot checks, submitted as fraud verdicts
        self.page: PageThread | None = None  # the status page of every stage (`start_page`)
        self.page_model: dict[str, Any] = {"name": cfg.preset, "stages": cfg.stages}  # model facts it shows
        self.page_chain: dict[str, dict[str, Any]] = {}  # node address -> on-chain figures it shows
        self.val_loss: float | None = None  # the last validation loss (`train`; None before an evaluation)
        self.outbox: ChainOutbox | None = None  # every chain write of the settlement, inference and claims

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    # -- chain -------------------------------------------------------------------------------------

    def setup_chain(self) -> None:
        cfg = self.cfg
        self.w3 = connect(self.chain_url)
        if is_embedded(self.w3):
            self.rpc_url, self.stop_chain = serve_embedded(self.w3)
            self.say(f"[bold]chain[/] embedded py-evm, served at {self.rpc_url} for the node processes")
        else:
            self.rpc_url = self.chain_url or ""
            self.say(f"[bold]chain[/] external RPC {self.rpc_url}")
        accounts = test_accounts(self.w3)
        self.admin, self.researcher, self.client_account = accounts[0], accounts[1], accounts[2]
        self.validators = accounts[3:3 + cfg.validators]
        self.funder = accounts[3 + cfg.validators]
        deployment = deploy_all(self.w3, self.admin, [v.address for v in self.validators], cfg.quorum)
        self.deployment_path = self.root / "deployment.json"
        deployment.save(self.deployment_path)
        self.client = ProtocolContracts(self.w3, deployment)
        self.domain = Domain(deployment.chain_id, deployment.addresses["ContributionLedger"])
        self.open_outbox(deployment)
        self.say(f"[bold]contracts[/] deployed on chain {deployment.chain_id}: "
                 + ", ".join(f"{k} {v[:10]}…" for k, v in sorted(deployment.addresses.items())))

    def open_outbox(self, deployment: Deployment) -> None:
        """The durable outbox of this run's chain writes. The outbox of an earlier run in the same directory
        (another deployment, whose keys a fresh anvil could repeat) is moved aside, not deleted."""
        cfg = self.cfg
        out = OutboxConfig(data_dir=self.root, retry_interval_s=cfg.outbox_retry_interval_s,
                           max_backoff_s=cfg.outbox_max_backoff_s, call_timeout_s=cfg.outbox_call_timeout_s,
                           drain_timeout_s=cfg.chain_outage_timeout_s)
        path = self.root / out.filename
        if path.exists():
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                old = path.with_name(path.name + suffix)
                if old.exists():
                    old.rename(path.with_name(f"{path.stem}.{stamp}{path.suffix}{suffix}"))
        self.outbox = ChainOutbox.open(out, self.rpc_url, deployment, [self.validators[0], self.client_account])

    def write(self, *keys: str) -> list[dict[str, Any]]:
        """Send the queued chain writes (waiting out an RPC outage, bounded); the results of `keys`."""
        assert self.outbox is not None
        try:
            self.outbox.drain()
        except OutboxError as exc:
            raise CLIError(str(exc)) from None
        return [self.outbox.result(k) for k in keys]

    @property
    def layout(self) -> list[int]:
        """The stage of each node process (node i serves layout[i]; stage 0's first node leads)."""
        return [s for s in range(self.cfg.stages) for _ in range(self.cfg.replicas)]

    def recipe(self) -> TrainingRecipe:
        """The proposal's training section: what the nodes run (replicated: the exchange and schedule too)."""
        cfg = self.cfg
        recipe = TrainingRecipe(stages=cfg.stages, codec=cfg.codec, microbatches=cfg.microbatches,
                                microbatch_size=cfg.microbatch_size, lr=cfg.lr, warmup_steps=OptimConfig().warmup_steps)
        if cfg.replicas == 1:
            return recipe
        # one contribution per replica and step: what the async schedule with replicas exchanges, and what lets the
        # leading head hand stage-0 microbatches to the other head replicas
        return replace(recipe, replica_averaging=cfg.replica_averaging, powersgd_rank=cfg.powersgd_rank,
                       powersgd_bits=cfg.powersgd_bits, replica_exchange="step",
                       pipeline_schedule=cfg.replica_schedule, max_staleness=cfg.max_staleness)

    def propose(self) -> None:
        cfg = self.cfg
        model, data = PRESETS[cfg.preset], self.prepare_data()
        if data.tokenizer == "bpe":
            model = replace(model, vocab_size=cfg.bpe_vocab_size)
        self.proposal = ModelProposal(
            model, self.recipe(),
            ProposalTerms(metadata_uri=f"pmn-demo:{cfg.preset}", epoch_length=cfg.epoch_length,
                          challenge_window_s=cfg.challenge_window_s, audit_rate=cfg.audit_rate,
                          inference_fee_wei=cfg.inference_fee_wei), data).validate()
        (self.root / "model.json").write_text(json.dumps(model.to_dict(), sort_keys=True))
        (self.root / "data.json").write_text(json.dumps(data.to_dict(), sort_keys=True))
        t = self.proposal.terms
        self.model_id = self.client.propose_model(
            self.researcher, self.proposal.content_hash(), t.metadata_uri, cfg.stages, accounting_function_hash(),
            t.epoch_length, t.challenge_window_s, self.proposal.audit_rate_bps, t.inference_fee_wei)
        self.client.start_training(self.researcher, self.model_id)
        self.specs = partition(model, cfg.stages)
        self.say(f"[bold]researcher[/] proposed model {self.model_id} ({cfg.preset}, {self._shape()}, "
                 f"spec 0x{self.proposal.content_hash().hex()[:16]}…) and started training")

    def prepare_data(self) -> DataSpec:
        """The proposal's [data]: documents pinned by manifest, a BPE trained here (or bytes), tokenized once."""
        cfg = self.cfg
        start = time.perf_counter()
        if cfg.tokenizer == "bpe":
            data = local_bpe_data(self.root, cfg.data_source, cfg.bpe_vocab_size, cfg.data_max_mb)
        else:
            docs = read_documents(cfg.data_source)
            data = DataSpec(source=cfg.data_source, manifest_hash=manifest_hash(docs), max_mb=cfg.data_max_mb,
                            prepared_dir=str(self.root / "data"))
            prepare(data.validate(), 256)
        self.tokenizer = tokenizer_of(data)
        self.say(f"[bold]data[/] {cfg.data_source} ({cfg.data_max_mb or 'all'} MiB), manifest "
                 f"0x{data.manifest_hash[:16]}…, {cfg.tokenizer} tokenizer of {self.tokenizer.vocab_size} ids "
                 f"(0x{self.tokenizer.content_hash[:16]}…), tokenized in {time.perf_counter() - start:.1f} s")
        return data

    def _shape(self) -> str:
        r = self.cfg.replicas
        return f"{self.cfg.stages} stages" + (f" x {r} replicas" if r > 1 else "")

    def register_nodes(self) -> None:
        self.identities = []
        for i, s in enumerate(self.layout):
            ident = load_or_create_identity(self.root / f"node{i}")
            self.identities.append(ident)
            assert self.outbox is not None
            self.outbox.add_signer(ident.account)  # each node claims its own revenue
            self.client.tx.transact(self.funder, to=ident.address, value=self.cfg.stake_funding_wei)
            stake = self.client.stake_required(1)
            self.client.register_node(ident.account, ident.account, 1, stake)
            self.client.assign_stage(ident.account, ident.address, self.model_id, s)  # + stakePerStage
        self.say(f"[bold]operators[/] registered {len(self.layout)} node keys with stake (node-key signatures checked "
                 f"on chain) and assigned each its stage ({self._shape()}, one stage per operator, "
                 f"{self.client.stake_per_stage()} wei per stage)")

    # -- swarm -------------------------------------------------------------------------------------

    def train(self) -> tuple[float, float]:
        cfg = self.cfg
        args = ["--model", str(self.root / "model.json"), "--dataset", str(self.root / "data.json"), "--codec", cfg.codec, "--steps", str(cfg.steps), "--microbatches",
                str(cfg.microbatches), "--microbatch-size", str(cfg.microbatch_size), "--lr", str(cfg.lr),
                "--rpc-url", self.rpc_url, "--deployment", str(self.deployment_path), "--model-id",
                str(self.model_id), "--linger", "--checkpoint-every", "0", "--device", cfg.device,
                "--eval-every", str(cfg.eval_every), "--eval-batches", str(cfg.eval_batches),
                "--discovery-discovery-timeout-s", str(cfg.discovery_timeout_s)]
        if cfg.replicas == 1:
            self.nodes = launch_swarm(self.root, cfg.stages, args, ready_timeout_s=cfg.node_ready_timeout_s,
                                      threads=[cfg.threads_per_node] * cfg.stages)
        else:  # the recipe's exchange and schedule; the leading head (node 0) records the validation loss
            r = self.proposal.training
            args += ["--replica-averaging", r.replica_averaging, "--powersgd-rank", str(r.powersgd_rank),
                     "--powersgd-bits", str(r.powersgd_bits), "--replica-exchange", r.replica_exchange,
                     "--schedule", r.pipeline_schedule, "--max-staleness", str(r.max_staleness),
                     "--max-inflight", str(cfg.replica_max_inflight)]
            self.nodes = launch_replicas(self.root, self.layout, args, ready_timeout_s=cfg.node_ready_timeout_s,
                                         threads=cfg.threads_per_node)
        for n in self.nodes:
            self.say(f"[bold]node[/] stage {n.ready['stage']} peer {n.ready['peer_id'][:16]}… "
                     f"address {n.ready['address']} at {n.ready['addrs'][0]}")
        deadline = time.monotonic() + cfg.train_timeout_s
        live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False) \
            if self.console is not None else None
        try:
            if live:
                live.start()
            while True:
                states = [node_status(n.data_dir).get("state") for n in self.nodes]
                if live:
                    live.update(self._table())
                if all(s == "serving" for s in states):
                    break
                for n, s in zip(self.nodes, states, strict=True):
                    if n.proc.poll() is not None or s == "failed":
                        err = (n.data_dir / "stderr.log").read_text()[-800:]
                        raise CLIError(f"node for stage {n.stage} stopped during training: {err.strip()[-400:]}")
                if time.monotonic() > deadline:
                    raise CLIError(f"training did not finish within {cfg.train_timeout_s} s (states {states})")
                time.sleep(cfg.poll_s)
        finally:
            if live:
                live.stop()
        tail = read_progress(self.nodes[-1].data_dir)
        losses = [float(r["loss"]) for r in sorted(tail, key=lambda r: r["step"]) if r.get("loss") is not None]
        if len(losses) < 2:
            raise CLIError("the tail stage reported fewer than two losses")
        self.losses = losses
        # the last evaluation's mean validation loss: the tail records it (gpipe, 1f1b), the head in async and
        # replicated runs (`val_step`: the step it followed)
        vals = sorted((int(r.get("val_step", r["step"])), float(r["val_loss"])) for n in self.nodes
                      for r in read_progress(n.data_dir) if r.get("val_loss") is not None)
        self.val_loss = vals[-1][1] if vals else None
        k = min(3, len(losses) // 2)
        return sum(losses[:k]) / k, sum(losses[-k:]) / k

    def _table(self) -> Table:
        table = Table(title=f"training model {getattr(self, 'model_id', '?')} — {self._shape()} over libp2p")
        for col in ("stage", "step", "epoch", "loss", "tokens/s", "receipts", "compute (co-signed)"):
            table.add_column(col, justify="right")
        per_unit = {s.index: self._units_per_hop(s.index) for s in self.specs}
        for n in self.nodes:
            prog = read_progress(n.data_dir)
            last = prog[-1] if prog else {}
            receipts = self._count_receipts(n.data_dir)
            step = last.get("step", -1)
            table.add_row(str(n.stage), str(step + 1), str(max(step, 0) // self.cfg.epoch_length),
                          f"{last['loss']:.3f}" if last.get("loss") is not None else "",
                          f"{last.get('tokens_per_s', 0):.0f}", str(receipts),
                          _fmt_units(receipts // self._hops_per_microbatch(n.stage) * per_unit[n.stage]))
        return table

    def _hops_per_microbatch(self, stage: int) -> int:
        """Co-signed receipts a stage's store holds per microbatch: both directions on each neighbour link."""
        return 2 * ((stage > 0) + (stage < self.cfg.stages - 1))

    def _units_per_hop(self, stage: int) -> int:
        from protocol.accounting import compute_units

        return compute_units(self.proposal.model, self.specs[stage], self.cfg.microbatch_size * self.proposal.model.seq_len)

    @staticmethod
    def _count_receipts(data_dir: Path) -> int:
        import sqlite3

        path = data_dir / "receipts.sqlite"
        if not path.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
                return int(db.execute("SELECT COUNT(*) FROM receipts WHERE receiver_signature IS NOT NULL").fetchone()[0])
        except sqlite3.Error:
            return 0

    # -- settlement --------------------------------------------------------------------------------

    def gather(self, epoch: int) -> list[SignedReceipt]:
        """An attester collects the epoch's co-signed receipts from every node's store."""
        registry = StaticKeyRegistry([i.address for i in self.identities])
        seen: dict[tuple[int, ...], SignedReceipt] = {}
        for n in self.nodes:
            store = ReceiptStore(StoreConfig(data_dir=n.data_dir), self.domain, registry)
            try:
                for r in store.epoch_receipts(self.model_id, epoch, cosigned_only=True):
                    seen.setdefault(hop_id(r), r)
            finally:
                store.close()
        return list(seen.values())

    def settle(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        registry = StaticKeyRegistry([i.address for i in self.identities])
        results: list[dict[str, Any]] = []
        for epoch in range(cfg.steps // cfg.epoch_length):
            ctx = EpochContext(self.model_id, epoch, self.proposal.model, tuple(self.specs), self.domain)
            result = build_epoch(self.gather(epoch), ctx, registry)
            assert self.outbox is not None
            self.write(queue_epoch(self.outbox, self.validators[0].address, result,
                                   attest(self.domain, result, self.validators[:cfg.quorum])))
            path = self.root / "receipts" / f"model{self.model_id}-epoch{epoch}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(result.receipts_file)
            results.append({"epoch": epoch, "result": result, "file": path})
            self.say(f"[bold]attesters[/] epoch {epoch}: {len(result.receipts)} co-signed receipts, root "
                     f"0x{result.root.hex()[:16]}…, {cfg.quorum}-of-{cfg.validators} signatures, published {path.name}")
            self.spot_check(epoch, result.receipts)
        if not results:
            raise CLIError(f"no epoch completed: steps ({cfg.steps}) < epoch_length ({cfg.epoch_length})")
        if self.evidence:
            slashed = submit_frauds(self.client, self.validators[0], self.validators[:cfg.quorum], self.evidence)
            self.say(f"[bold]attesters[/] fraud verdicts submitted inside the challenge window; slashed {slashed}")
        advance_time(self.w3, cfg.challenge_window_s + 1)
        voided = [e.node for e in self.evidence]
        assert self.outbox is not None
        for item in results:  # shares go to each node's operator
            queue_claims(self.outbox, self.validators[0].address, item["result"], skip=voided)
        self.write()
        self.say("[bold]ledger[/] challenge window passed; every node claimed its leaves and was minted shares")
        return results

    def spot_check(self, epoch: int, receipts: list[SignedReceipt]) -> None:
        """Attesters re-execute a sample of the epoch's hops at the model's audit rate, fetched over libp2p."""
        rate = self.client.get_model(self.model_id).terms.audit_rate_bps / 10_000
        peers = {n.ready["address"]: n.ready["addrs"][0] for n in self.nodes}
        checked = failed = 0
        stages: list[int] = []
        for validator in self.validators:  # each audits the one stage and the hops the published rule assigns it
            role = attester_role(self.client, validator, self.model_id, epoch)
            report = spot_check(self.model_id, peers, receipts, self.proposal.model, self.specs, self.cfg.codec,
                                self.cfg.microbatches, SpotCheckConfig(audit_rate=rate, seed=epoch), role=role)
            stage = attester_stage(validator.address, self.model_id, epoch, self.cfg.stages, role.attesters)
            stages += [] if stage is None else [stage]
            checked += report.checked
            failed += report.failed
            self.evidence += report.evidence
        self.spot_checks["checked"] += checked
        self.spot_checks["failed"] += failed
        self.say(f"[bold]attesters[/] epoch {epoch}: spot-checked {checked} hops of stages {sorted(set(stages))} at "
                 f"audit rate {rate:g}, each attester only its sampled hops (state and inputs fetched over "
                 f"/pmn/audit/1.0.0, re-executed on CPU): {failed} failed")

    # -- inference ---------------------------------------------------------------------------------

    def infer(self) -> list[str]:
        texts = []
        head = self.nodes[0].ready["addrs"][0]
        for i in range(self.cfg.inference_requests):
            request_id = os.urandom(32)
            assert self.outbox is not None
            (paid,) = self.write(self.outbox.deposit(self.client_account.address, self.model_id,
                                                     self.cfg.inference_fee_wei, request_id))
            tx_hash = bytes.fromhex(paid["tx_hash"][2:])
            sampling = Sampling(self.cfg.sample_temperature, self.cfg.sample_top_k, self.cfg.sample_seed + i)
            tokens = trio.run(self._generate, head, request_id, tx_hash, sampling)
            text = self.tokenizer.decode(tokens)
            texts.append(text)
            self.say(f"[bold]inference[/] request {i + 1}: paid {self.cfg.inference_fee_wei} wei "
                     f"(tx 0x{tx_hash.hex()[:12]}…) → {self.cfg.prompt!r} + {text!r}")
        return texts

    async def _generate(self, head: str, request_id: bytes, tx_hash: bytes, sampling: Sampling) -> list[int]:
        async with head_stream_opener(head) as open_stream:
            with trio.fail_after(self.cfg.inference_timeout_s):
                return [t async for t in generate(open_stream, self.tokenizer.encode(self.cfg.prompt), request_id=request_id,
                                                  tx_hash=tx_hash, max_new_tokens=self.cfg.max_new_tokens,
                                                  sampling=sampling)]

    # -- status page -------------------------------------------------------------------------------

    def start_page(self) -> str:
        """Serve the page of every stage (node files + the chain figures this process reads); its URL."""
        cfg = self.cfg
        self.page = PageThread(make_app(self._page_source, cfg.status_poll_s), cfg.status_host, cfg.status_port)
        self.say(f"[bold]status page[/] {self.page.url} (every stage, live)")
        return self.page.url

    def stop_page(self) -> None:
        if self.page is not None:
            self.page.stop()

    async def _page_source(self) -> dict[str, Any]:
        def read() -> list[tuple[dict[str, Any], dict[str, Any]]]:
            parts = []
            for n in list(self.nodes):
                address = n.ready.get("address", "")
                per = self._units_per_hop(n.stage) / self._hops_per_microbatch(n.stage)
                row, series = node_part(n.data_dir, chain={**self.page_chain.get(address, {}),
                                                           "units_per_cosigned": per})
                parts.append(({**row, "steps_total": self.cfg.steps}, series))
            return parts

        parts = await trio.to_thread.run_sync(read)
        return page(f"pmn demo · model {self.page_model.get('model_id', '?')} · {self._shape()}",
                    dict(self.page_model), parts)

    def update_page_chain(self) -> None:
        """Re-read what the page shows from the chain (terms, shares, claimable revenue); main thread only."""
        if not hasattr(self, "model_id"):
            return
        info = self.client.get_model(self.model_id)
        t, supply = info.terms, self.client.total_supply(self.model_id)
        self.page_model.update(model_id=self.model_id, spec_hash="0x" + self.proposal.content_hash().hex(),
                               params=param_count(self.proposal.model), terms={
            "epoch_length": t.epoch_length, "audit_rate": t.audit_rate_bps / 10_000,
            "challenge_window_s": t.challenge_window, "inference_fee_wei": t.inference_fee_wei, "status": info.status,
            "total_shares": supply,
            "revenue_deposited_wei": int(self.client.token(self.model_id).functions.totalDeposited().call())})
        for ident in getattr(self, "identities", []):
            shares = self.client.balance_of(self.model_id, ident.address)
            self.page_chain[ident.address] = {"shares": shares, "fraction": shares / supply if supply else 0.0,
                                              "claimable_wei": self.client.claimable(self.model_id, ident.address)}

    # -- the whole loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self.setup_chain()
            self.propose()
            self.register_nodes()
            self.update_page_chain()
            self.start_page()
            loss_start, loss_end = self.train()
            epochs = self.settle()
            self.update_page_chain()
            texts = self.infer()
            self.update_page_chain()
            deposited = self.cfg.inference_fee_wei * self.cfg.inference_requests
            supply = self.client.total_supply(self.model_id)
            nodes = []
            for ident, n in zip(self.identities, self.nodes, strict=True):
                units = sum(e["result"].totals.get(ident.address, 0) for e in epochs)
                shares = self.client.balance_of(self.model_id, ident.address)
                left = self.keep and n.stage == 0  # left for the printed `pmn claim` line
                claimed = 0
                if self.client.claimable(self.model_id, ident.address) > 0 and not left:
                    assert self.outbox is not None
                    (got,) = self.write(self.outbox.claim_revenue(ident.address, self.model_id, "demo"))
                    claimed = int(got["amount_wei"])
                nodes.append({"stage": n.stage, "peer_id": n.ready["peer_id"], "address": ident.address,
                              "compute_units": units, "shares": shares, "fraction": shares / supply if supply else 0.0,
                              "revenue_claimed_wei": claimed})
            self.update_page_chain()
            return {"model_id": self.model_id, "nodes": nodes, "loss_start": loss_start, "loss_end": loss_end,
                    "epochs_settled": len(epochs), "revenue_deposited_wei": deposited,
                    "inference_text": texts[0] if texts else "", "inference_texts": texts,
                    "total_shares": supply, "receipts_files": [str(e["file"]) for e in epochs],
                    "spot_checks": dict(self.spot_checks),
                    "status_url": self.page.url if self.page is not None else None, "losses": self.losses,
                    "val_loss": self.val_loss,
                    **(self.kept(epochs) if self.keep else {})}
        finally:
            stop_nodes(self.nodes)
            if not self.keep_chain:
                self.close_chain()

    def close_chain(self) -> None:
        """Stop the embedded chain (if any) and close the connection and the outbox (idempotent)."""
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None
        if self.stop_chain is not None:
            self.stop_chain()
            self.stop_chain = None
        if hasattr(self, "w3"):
            disconnect(self.w3)
            del self.w3

    # -- what a newcomer can try afterwards ------------------------------------------------------

    def kept(self, epochs: list[dict[str, Any]]) -> dict[str, Any]:
        """Keystores of the node keys (they are the operators, so they hold the shares) and the holder's
        commands, ready to run against this chain with the kept files."""
        from eth_account import Account

        keys = self.root / "keystores"
        keys.mkdir(exist_ok=True)
        password = self.root / "password.txt"
        if not password.exists():
            password.write_text(os.urandom(12).hex())
            password.chmod(0o600)
        pw = password.read_text().strip()
        files = []
        for i, (ident, stage) in enumerate(zip(self.identities, self.layout, strict=True)):
            name = f"stage{stage}" + (f"-replica{i % self.cfg.replicas}" if self.cfg.replicas > 1 else "")
            files.append(keys / f"{name}.json")
            files[-1].write_text(json.dumps(Account.encrypt(ident.account.key, pw)))
            files[-1].chmod(0o600)
        chain = f"--rpc-url {self.rpc_url} --deployment {self.deployment_path}"
        holder = self.identities[0].address
        commands = [f"pmn shares --model {self.model_id} --holder {holder} {chain}",
                    f"pmn claim --model {self.model_id} --keystore {files[0]} --password-file {password} "
                    f"--outbox-dir {self.root / 'holder-outbox'} {chain}"]
        commands += [f"pmn ledger verify --model {self.model_id} --epoch {e['epoch']} --receipts {e['file']} {chain}"
                     for e in epochs[:1]]
        commands += [f"pmn models {chain}"]
        return {"kept_dir": str(self.root), "holder_commands": commands}


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:g}"


def _eth(wei: int) -> str:
    return f"{wei / 1e18:.6f} ETH"


def summary_table(result: dict[str, Any]) -> Table:
    """The nodes' outcome in at most 100 columns (full ids are in the --json line)."""
    val = result.get("val_loss")
    val_text = f" (validation {val:.2f})" if isinstance(val, float) else ""
    table = Table(title=f"model {result['model_id']}: loss {result['loss_start']:.2f} → {result['loss_end']:.2f}"
                        f"{val_text}, {result['epochs_settled']} epochs settled, "
                        f"{_eth(result['revenue_deposited_wei'])} of fees")
    for col in ("stage", "peer id", "address", "compute", "shares", "fraction", "revenue claimed"):
        table.add_column(col, justify="right", no_wrap=True)
    for n in result["nodes"]:
        table.add_row(str(n["stage"]), n["peer_id"][:12] + "…", n["address"][:10] + "…", _fmt_units(n["compute_units"]),
                      _count(n["shares"]), f"{100 * n['fraction']:.2f} %", _eth(n["revenue_claimed_wei"]))
    return table


def print_summary(console: Console, result: dict[str, Any]) -> None:
    """Loss chart, table and (when the demo kept its files) the holder's commands."""
    from pmn.termchart import bar_chart

    if result.get("losses"):
        console.print(bar_chart(result["losses"], width=60, height=6, label="training loss (tail stage)"),
                      highlight=False, markup=False)
    console.print(summary_table(result))
    for i, text in enumerate(result.get("inference_texts", [])):
        console.print(f"answer {i + 1}: {text!r}", highlight=False, markup=False)
    if result.get("kept_dir"):
        console.print(f"[bold]kept[/] {result['kept_dir']} (deployment, receipts, keystores; password in "
                      "password.txt). Try, as the holder of stage 0:")
        for cmd in result["holder_commands"]:
            console.print("  " + cmd, soft_wrap=True, highlight=False, markup=False)


def load_demo_config(path: Path | None) -> DemoConfig:
    cfg = DemoConfig()
    if path is None:
        return cfg
    import tomllib

    if not path.exists():
        raise CLIError(f"demo config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CLIError(f"{path} is not valid TOML: {exc}") from None
    known = set(DemoConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise CLIError(f"{path}: unknown field(s) {', '.join(unknown)}")
    return replace(cfg, **data)


def _check_device(choice: str) -> None:
    """CLIError (one line) when the demo's device is not on this machine, before anything starts."""
    from sharding.device import device_info, resolve_device
    from sharding.errors import DeviceError

    try:
        print(device_info(resolve_device(choice)).line(), file=sys.stderr, flush=True)
    except DeviceError as exc:
        raise CLIError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = load_demo_config(args.config)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.stages is not None:
        cfg = replace(cfg, stages=args.stages)
    if getattr(args, "device", None) is not None:
        cfg = replace(cfg, device=args.device)
    _check_device(cfg.device)
    if getattr(args, "replicas", None) is not None:
        cfg = replace(cfg, replicas=args.replicas)
    if cfg.stages < 3:
        raise CLIError("the demo needs at least 3 stages: pass --stages 3 or more")
    if cfg.replicas < 1:
        raise CLIError(f"--replicas must be >= 1 (node processes per stage), got {cfg.replicas}")
    console = None if args.json else Console()
    serve = bool(getattr(args, "serve", False))
    keep_dir = getattr(args, "keep", None)
    keep = keep_dir is not None or args.chain_url is not None  # an external chain outlives the demo: so do its files
    if keep_dir is not None and args.data_dir is not None:
        raise CLIError("pass --keep DIR or --data-dir DIR, not both (--keep is a data dir that the demo keeps)")
    tmp = None
    if keep_dir is not None:
        root = keep_dir.expanduser().resolve()
    elif args.data_dir is not None:
        root = args.data_dir.expanduser()
    elif keep:
        root = Path(tempfile.mkdtemp(prefix="pmn-demo-"))  # named in the summary and the --json line
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pmn-demo-")
        root = Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    demo = Demo(cfg, root, args.chain_url, console, keep=keep)
    demo.keep_chain = serve  # with --serve an embedded chain stays up too, for the printed commands
    try:
        result = demo.run()
        if console is not None:
            print_summary(console, result)
            if keep and args.chain_url is None and not serve:
                console.print("(the embedded chain stopped with the demo: for these commands run the demo with "
                              "--serve, or against anvil with --chain-url)")
        out = {k: v for k, v in result.items() if k != "receipts_files" or args.data_dir is not None or keep}
        print(json.dumps(out), flush=True)
        if serve and demo.page is not None:
            print(f"serving the status page at {demo.page.url} until interrupted (Ctrl-C)", file=sys.stderr,
                  flush=True)
            threading.Event().wait()  # until SIGINT (KeyboardInterrupt)
    except KeyboardInterrupt:
        if not serve:
            raise
    finally:
        demo.stop_page()
        demo.close_chain()
        if tmp is not None:
            tmp.cleanup()
    return 0


__all__ = ["Demo", "DemoConfig", "cmd_demo"]
