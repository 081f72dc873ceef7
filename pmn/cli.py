"""`pmn`: the one command of operators, researchers, holders and newcomers.

Every failure a user can cause ends with one line on stderr that says what to do, a non-zero exit
status and no traceback (set PMN_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pmn.errors import CLIError

EXIT_USAGE = 2
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other failure of `pmn`."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _example(text: str) -> str:
    return "example:\n  " + "\n  ".join(text.strip().splitlines())


def _handler(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """Import command handlers lazily: `pmn --help` stays fast and independent of torch/web3."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(f"pmn.{module}"), func)(args) or 0)

    return run


def _add_chain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="role TOML file (see configs/); PMN_<FIELD> env vars override it")
    p.add_argument("--rpc-url", help="JSON-RPC URL of the chain (default: config rpc_url)")
    p.add_argument("--deployment", type=Path, help="deployment file written by the deployer (chain id, addresses, ABIs)")


def _add_key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keystore", type=Path, help="encrypted keystore file (default: the role config's)")
    p.add_argument("--password-file", type=Path, help="file holding the keystore password (else $PMN_PASSWORD, else a prompt)")


def _add_outbox_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outbox-dir", type=Path, help="the holder's durable chain outbox: payments and claims are "
                   "recorded there before they are sent, and a re-run resumes them (default: config outbox_dir)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="pmn",
        description="Protocol Model Network: train models across independent nodes, own them, earn from them.",
        epilog=_example("pmn demo            # the whole loop on embedded defaults\npmn demo --json     # same, last line JSON"),
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="run the whole loop locally: chain, swarm, settlement, shares, paid inference",
                       epilog=_example("pmn demo --json\npmn demo --chain-url http://127.0.0.1:8545"), formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument("--chain-url", help="use an external JSON-RPC chain (e.g. anvil) instead of the embedded one")
    p.add_argument("--config", type=Path, help="demo TOML file overriding DemoConfig fields")
    p.add_argument("--steps", type=int, help="training steps (default: the demo config's)")
    p.add_argument("--stages", type=int, help="pipeline stages (default: the demo config's)")
    p.add_argument("--replicas", type=int, help="node processes per stage (default: the demo config's, 1); above 1 "
                   "the stages are replicated: PowerSGD int4 between replicas, the async schedule, head work delegated")
    p.add_argument("--data-dir", type=Path, help="where the demo keeps node data (default: a temporary dir)")
    p.add_argument("--device", help="compute device of the node processes: auto, cpu, cuda, cuda:N, mps "
                                    "(default: the demo config's)")
    p.add_argument("--serve", action="store_true", help="keep the status page (and an embedded chain) up after the "
                   "demo, until Ctrl-C")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep the deployment file, receipts and keystores in DIR "
                   "and print the holder's commands for them (implied, in a named directory, by --chain-url)")
    p.set_defaults(func=_handler("demo", "cmd_demo"))

    # researcher
    p = sub.add_parser("propose", help="validate a model spec, print its content hash, register it on-chain",
                       epilog=_example("pmn propose configs/model-tiny.toml --rpc-url http://127.0.0.1:8545 --deployment deployment.json"),
                       formatter_class=fmt)
    p.add_argument("spec", type=Path, help="model spec TOML ([model], [training], [terms] tables)")
    p.add_argument("--dry-run", action="store_true", help="only validate and print the hash")
    _add_chain_flags(p)
    _add_key_flags(p)
    p.set_defaults(func=_handler("cmd_chain", "cmd_propose"))

    p = sub.add_parser("models", help="list the proposed models and their state",
                       epilog=_example("pmn models --rpc-url http://127.0.0.1:8545 --deployment deployment.json"), formatter_class=fmt)
    _add_chain_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_handler("cmd_models", "cmd_models"))

    # holder
    p = sub.add_parser("shares", help="share balance, fraction of supply, claimable and claimed revenue, epoch history",
                       epilog=_example("pmn shares --model 1 --holder 0xAbc... --rpc-url http://127.0.0.1:8545 --deployment deployment.json"),
                       formatter_class=fmt)
    p.add_argument("--model", type=int, required=True, help="model id")
    p.add_argument("--holder", help="holder address (default: the keystore's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_chain_flags(p)
    _add_key_flags(p)
    p.set_defaults(func=_handler("cmd_chain", "cmd_shares"))

    p = sub.add_parser("claim", help="claim the revenue accrued to your shares",
                       epilog=_example("pmn claim --model 1 --keystore holder.json --rpc-url http://127.0.0.1:8545 --deployment deployment.json"),
                       formatter_class=fmt)
    p.add_argument("--model", type=int, required=True, help="model id")
    _add_chain_flags(p)
    _add_key_flags(p)
    _add_outbox_flag(p)
    p.set_defaults(func=_handler("cmd_chain", "cmd_claim"))

    p = sub.add_parser("infer", help="pay the inference fee, send the prompt through the stage peers, stream the text",
                       epilog=_example('pmn infer --model 1 "def main(" --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... \\\n'
                                      '  --rpc-url http://127.0.0.1:8545 --deployment deployment.json --keystore holder.json'),
                       formatter_class=fmt)
    p.add_argument("--model", type=int, required=True, help="model id")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (1..256)")
    p.add_argument("--bootstrap", action="append", default=None, help="multiaddr of a stage-0 peer (repeatable)")
    p.add_argument("--tx-hash", help="use this earlier payment instead of paying now (no keystore needed)")
    p.add_argument("--request-id", help="request id the --tx-hash payment was made for (default: read from the chain)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="longest wait to reach the peer, and for the answer")
    _add_chain_flags(p)
    _add_key_flags(p)
    _add_outbox_flag(p)
    p.set_defaults(func=_handler("cmd_infer", "cmd_infer"))

    # operator
    p = sub.add_parser("node", help="run and inspect a node (operators)", formatter_class=fmt,
                       epilog=_example("pmn node start --model configs/model-tiny.toml --data-dir ~/.pmn/node\n"
                                       "pmn node status --data-dir ~/.pmn/node --model configs/model-tiny.toml"))
    nsub = p.add_subparsers(dest="node_command", metavar="NODE_COMMAND")
    nsub.required = True
    q = nsub.add_parser("start", help="start a node daemon serving one pipeline stage",
                        epilog=_example("pmn node start --model tiny --stage auto --data-dir ~/.pmn/node \\\n"
                                        "  --listen /ip4/0.0.0.0/tcp/4001 --bootstrap /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW..."),
                        formatter_class=fmt)
    q.add_argument("--config", type=Path, help="operator TOML file")
    from node.cli import add_config_flags  # one flag per NodeConfig field (node.cli); no torch, no libp2p

    add_config_flags(q, None, help_overrides={
        "model": "model spec: preset name, spec TOML path or ModelConfig JSON path; or an on-chain model id, or "
                 "'auto' (best expected revenue per compute unit, docs/MODEL_CHOICE.md): its spec is fetched from "
                 "--bootstrap peers and checked against the chain's hash (default: the config's)",
        "num_stages": "pipeline stages (default: the spec TOML's [training] stages, else the config's)"})
    q.set_defaults(func=_handler("cmd_node", "cmd_node_start"))
    q = nsub.add_parser("join", help="register this node on chain and assign it a model's stage (operator stakes)",
                        epilog=_example("pmn node join --model auto --data-dir ~/.pmn/node --keystore operator.json \\\n"
                                        "  --rpc-url http://127.0.0.1:8545 --deployment deployment.json"),
                        formatter_class=fmt)
    _add_chain_flags(q)
    _add_key_flags(q)
    q.add_argument("--model", help="on-chain model id, or 'auto' (docs/MODEL_CHOICE.md) (default: the config's)")
    q.add_argument("--stage", type=int, help="stage to serve (default: where a newcomer does the largest part of the work)")
    q.add_argument("--data-dir", type=Path, help="node state directory holding the node key (created when missing)")
    q.add_argument("--capacity", type=int, help="declared capacity units; the stake scales with it (default: config)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_handler("cmd_join", "cmd_node_join"))
    q = nsub.add_parser("status", help="stage, peers, throughput, compute credited and pending",
                        epilog=_example("pmn node status --data-dir ~/.pmn/node --model tiny-subspace --stages 3 --json"),
                        formatter_class=fmt)
    q.add_argument("--data-dir", type=Path, help="node state directory")
    q.add_argument("--model", help="model the node trains: preset name, spec TOML or ModelConfig JSON (default: config)")
    q.add_argument("--stages", type=int, help="pipeline stages of the model (default: the spec's, else the config's)")
    q.add_argument("--config", type=Path, help="operator TOML file")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_handler("cmd_node", "cmd_node_status"))

    p = sub.add_parser("data", help="pin a dataset and tokenizer in a spec: manifest, tokenizer, prepare",
                       formatter_class=fmt, epilog=_example("pmn data manifest stdlib\n"
                                                            "pmn data tokenizer stdlib --vocab-size 4096 --out tok.json\n"
                                                            "pmn data prepare spec.toml"))
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True
    source_help = "'stdlib', 'synthetic[:SEED]', a directory, a .jsonl or .parquet file"
    q = dsub.add_parser("manifest", help="print the manifest hash of a document source ([data] manifest_hash)",
                        epilog=_example("pmn data manifest stdlib\npmn data manifest corpus.jsonl --text-field body"),
                        formatter_class=fmt)
    q.add_argument("source", help=source_help)
    q.add_argument("--text-field", default="text", help="jsonl/parquet column holding the text")
    q.set_defaults(func=_handler("cmd_data", "cmd_data_manifest"))
    q = dsub.add_parser("tokenizer", help="train a byte-level BPE locally on a source's training split",
                        epilog=_example("pmn data tokenizer stdlib --vocab-size 4096 --out tokenizer.json"),
                        formatter_class=fmt)
    q.add_argument("source", help=source_help)
    q.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary (>= 257, <= the model's)")
    q.add_argument("--out", type=Path, required=True, help="tokenizer.json to write")
    q.add_argument("--val-percent", type=int, default=5, help="validation share left out ([data] val_percent)")
    q.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to be merged")
    q.add_argument("--max-mb", type=int, default=0, help="[data] max_mb: an evenly strided sample of at most this "
                                                         "many MiB of documents (0 = all)")
    q.add_argument("--text-field", default="text", help="jsonl/parquet column holding the text")
    q.add_argument("--force", action="store_true", help="overwrite --out")
    q.set_defaults(func=_handler("cmd_data", "cmd_data_tokenizer"))
    q = dsub.add_parser("prepare", help="check a spec's document and tokenizer hashes, tokenize once per split",
                        epilog=_example("pmn data prepare spec.toml"), formatter_class=fmt)
    q.add_argument("spec", type=Path, help="spec TOML with a [data] section")
    q.add_argument("--prepared-dir", type=Path, help="where token files go (default: [data] prepared_dir, else ~/.pmn/data)")
    q.add_argument("--force", action="store_true", help="tokenize again even if matching files exist")
    q.set_defaults(func=_handler("cmd_data", "cmd_data_prepare"))

    p = sub.add_parser("swarm", help="run a local swarm of node processes on 127.0.0.1",
                       epilog=_example("pmn swarm --stages 3 --steps 20"), formatter_class=fmt)
    p.add_argument("--stages", type=int, default=3, help="pipeline stages (one node process each)")
    p.add_argument("--steps", type=int, default=20, help="global training steps")
    p.add_argument("--model", default="tiny", help="model preset")
    p.add_argument("--codec", default=None, help="boundary codec (dense, bf16, int8, subspace)")
    p.add_argument("--data-dir", type=Path, help="where node data dirs go (default: a temporary dir)")
    p.add_argument("--device", default="auto", help="compute device of every node: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--json", action="store_true", help="print JSON as the last line")
    p.set_defaults(func=_handler("cmd_node", "cmd_swarm"))

    p = sub.add_parser("wallet", help="encrypted keystores (the key is never printed)", formatter_class=fmt,
                       epilog=_example("pmn wallet new --keystore ~/.pmn/operator.json\n"
                                       "pmn wallet show --keystore ~/.pmn/operator.json"))
    wsub = p.add_subparsers(dest="wallet_command", metavar="WALLET_COMMAND")
    wsub.required = True
    q = wsub.add_parser("new", help="create an account in an encrypted keystore",
                        epilog=_example("PMN_PASSWORD=... pmn wallet new --keystore ~/.pmn/operator.json"), formatter_class=fmt)
    q.add_argument("--keystore", type=Path, required=True, help="where to write the keystore")
    q.add_argument("--password-file", type=Path, help="file holding the new password (else $PMN_PASSWORD, else a prompt)")
    q.add_argument("--force", action="store_true", help="overwrite an existing keystore")
    q.set_defaults(func=_handler("cmd_wallet", "cmd_wallet_new"))
    q = wsub.add_parser("show", help="show a keystore's address; with --check, verify the password",
                        epilog=_example("pmn wallet show --keystore ~/.pmn/operator.json --check"), formatter_class=fmt)
    q.add_argument("--keystore", type=Path, required=True, help="keystore file")
    q.add_argument("--check", action="store_true", help="decrypt to verify the password")
    q.add_argument("--password-file", type=Path, help="file holding the password")
    q.set_defaults(func=_handler("cmd_wallet", "cmd_wallet_show"))

    # chain tooling
    p = sub.add_parser("contracts", help="Solidity toolchain", formatter_class=fmt,
                       epilog=_example("pmn contracts build --check\n"
                                       "pmn contracts deploy --rpc-url http://127.0.0.1:8545 --keystore admin.json "
                                       "--out deployment.json"))
    csub = p.add_subparsers(dest="contracts_command", metavar="CONTRACTS_COMMAND")
    csub.required = True
    q = csub.add_parser("build", help="recompile contracts/src with solc-js into contracts/build",
                        epilog=_example("pmn contracts build\npmn contracts build --check"), formatter_class=fmt)
    q.add_argument("--check", action="store_true", help="fail if the committed artifacts differ from a fresh compile")
    q.set_defaults(func=_handler("cmd_chain", "cmd_contracts_build"))
    q = csub.add_parser("deploy", help="deploy every contract and write the deployment file",
                        epilog=_example("pmn contracts deploy --rpc-url http://127.0.0.1:8545 --keystore admin.json --out deployment.json"),
                        formatter_class=fmt)
    q.add_argument("--out", type=Path, required=True, help="deployment file to write")
    q.add_argument("--validator", action="append", default=[], help="validator address (repeatable)")
    q.add_argument("--quorum", type=int, default=1, help="attester signatures required per epoch root")
    _add_chain_flags(q)
    _add_key_flags(q)
    q.set_defaults(func=_handler("cmd_chain", "cmd_contracts_deploy"))

    p = sub.add_parser("ledger", help="contribution ledger", formatter_class=fmt,
                       epilog=_example("pmn ledger verify --model 1 --epoch 0 --receipts model1-epoch0.json "
                                       "--rpc-url URL --deployment deployment.json"))
    lsub = p.add_subparsers(dest="ledger_command", metavar="LEDGER_COMMAND")
    lsub.required = True
    q = lsub.add_parser("verify", help="recompute an epoch's Merkle root from its published receipts and compare with the chain",
                        epilog=_example("pmn ledger verify --model 1 --epoch 0 --receipts epoch-1-0.json --rpc-url ... --deployment ..."),
                        formatter_class=fmt)
    q.add_argument("--model", type=int, required=True, help="model id")
    q.add_argument("--epoch", type=int, required=True, help="epoch number")
    q.add_argument("--receipts", type=Path, required=True, help="the epoch's published receipts file")
    _add_chain_flags(q)
    q.set_defaults(func=_handler("cmd_chain", "cmd_ledger_verify"))

    p = sub.add_parser("simulate", help="discrete-event simulations", formatter_class=fmt,
                       epilog=_example("pmn simulate wan --preset protocolnanogpt\npmn simulate incentives --json"))
    ssub = p.add_subparsers(dest="simulate_command", metavar="SIMULATE_COMMAND")
    ssub.required = True
    q = ssub.add_parser("wan", help="WAN pipeline throughput and time to target loss",
                        epilog=_example("pmn simulate wan --preset protocolnanogpt --json"), formatter_class=fmt)
    q.add_argument("--preset", default="protocolnanogpt", help="scenario preset")
    q.add_argument("--json", action="store_true", help="print JSON as the last line")
    q.add_argument("--plots", type=Path, help="directory for PNG plots")
    q.add_argument("--vs", choices=["datacenter"], help="compare time to target with the same model on 100 Gb/s links")
    q.add_argument("--schedule", choices=["gpipe", "1f1b", "async"], help="pipeline schedule (--vs: default async)")
    q.add_argument("--max-staleness", type=int, default=3,
                   help="async: the staleness bound (--vs; the node's runtime.max_staleness: with --contributions step "
                        "a node runs the steps a .. a + S, a the updates it applied; default 3, the node's fastest "
                        "to the target loss here since its finishes run side by side)")
    q.add_argument("--averaging", default="powersgd:12:int4",
                   help="replica averaging (--vs): dense, powersgd:R[:int8|:int4], diloco:H (default: the node's "
                        "PowerSGD rank 12 with int4 factors, the rank with the smallest measured loss penalty)")
    q.add_argument("--overlap-averaging", action=argparse.BooleanOptionalAction, default=None,
                   help="--vs: averaging on the uplinks while compute goes on (DiLoCo: outer step one round late; "
                        "PowerSGD: each microbatch's factors pushed after its backward, the update waiting for them, "
                        "as the node does); default: on unless --averaging dense")
    q.add_argument("--contributions", choices=["microbatch", "step"], default=None,
                   help="--vs, PowerSGD overlapped: factors per microbatch a replica computes (the node's default) or "
                        "one per replica and step (the node's replica_exchange = step: sent once the step's commit "
                        "reaches the replica's stage; under async with --head leader or delegated when the replica "
                        "finishes the step, as the node does; with --head lanes after its last backward, which is "
                        "optimistic); async with replicas runs in the node only with step (default: step under "
                        "--schedule async with PowerSGD overlapped, the node as built; microbatch otherwise)")
    q.add_argument("--head", choices=["leader", "delegated", "lanes"], default=None,
                   help="--vs: stage 0 on the WAN side: leader, one head replica computes every microbatch while the "
                        "others stand by (the node with --contributions microbatch); delegated, the leader hands them "
                        "to the others as tasks (the node's replicas.head_delegation with --contributions step, gpipe "
                        "or async; under async only with step); lanes, every head replica a share with no "
                        "coordination (delegation's upper bound: a what-if, not built; default: delegated with "
                        "--contributions step, the node as built, leader otherwise)")
    q.add_argument("--microbatch-seqs", type=int, default=2,
                   help="--vs: sequences per WAN microbatch (512 per step; the datacenter keeps 2): fewer, larger "
                        "microbatches mean fewer per-microbatch contributions")
    q.add_argument("--inflight-per-replica", type=int, default=None, metavar="N",
                   help="--vs: microbatches a WAN sender may have outstanding at one downstream replica (the node's "
                        "replicas.max_inflight, the head leader's and its delegates' sends too; 0: no cap); default: 4, "
                        "the node's, for the node as built (--schedule gpipe, or async with --contributions step; "
                        "--head leader, or delegated with --contributions step), no cap otherwise")
    q.add_argument("--tasks-per-delegate", type=int, default=None, metavar="N",
                   help="--vs, --head delegated: the leader's tasks one head delegate may hold at once (the node's "
                        "replicas.max_tasks; 0: no cap); default: 16, the node's, for the node as built (with "
                        "--contributions step), no cap otherwise")
    q.add_argument("--collective", choices=["direct", "sharded"], default="direct",
                   help="--vs, async with --head leader or delegated and --contributions step: how a step's bundles "
                        "reach the stage peers: direct, each replica pushes its bundle to every peer (the node); "
                        "sharded, each sends every peer the share of its bundle that peer owns and the owners send "
                        "their summed share to all (a reduce-scatter and all-gather: 2 (r - 1) / r of a bundle on each "
                        "uplink instead of r - 1 bundles, in the two rounds, P then Q, of PowerSGD with a common Q, "
                        "the code linear across replicas it needs; a what-if, not built; its loss penalty: "
                        "--averaging-loss-ratio)")
    q.add_argument("--async-loss-ratio", type=float, default=None,
                   help="--vs what-if: the async loss penalty at equal tokens (default: the calibration file's)")
    q.add_argument("--averaging-loss-ratio", type=float, default=None,
                   help="--vs what-if: the averaging loss penalty at equal tokens (default: the calibration file's)")
    q.set_defaults(func=_handler("cmd_simulate", "cmd_wan"))
    q = ssub.add_parser("incentives", help="net earnings of honest nodes and attacker classes",
                        epilog=_example("pmn simulate incentives --json"), formatter_class=fmt)
    q.add_argument("--json", action="store_true", help="print JSON as the last line")
    q.add_argument("--plots", type=Path, help="directory for PNG plots")
    q.set_defaults(func=_handler("cmd_simulate", "cmd_incentives"))
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 600 else text[:597] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # the error boundary: one line, no traceback
        if os.environ.get("PMN_DEBUG"):
            raise
        name = type(exc).__name__
        crafted = isinstance(exc, CLIError) or (name.endswith("Error") and name in str(exc))
        print(f"error: {_one_line(exc)}" + ("" if crafted else f" [{name}]"), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
