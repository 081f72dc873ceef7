"""`pmn infer`: pay the model's fee on chain, then stream text generated through the stage peers.

The stage peer is dialled before anything is paid, so an unreachable peer costs no fee. The fee goes
through the holder's durable chain outbox (pmn/holder_outbox.py): the request id is recorded before the
payment is sent, a payment whose answer was lost (RPC down, no receipt) stays queued and a re-run for the
same model resumes it (paid exactly once), and a payment no generation has used yet is reused by the next
run instead of paying again. With `--tx-hash` (and `--request-id`) a payment made earlier is used instead;
the stages check it against the chain and serve each paid request once.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import sys
from typing import Any

import trio
from eth_account.signers.local import LocalAccount

from pmn.cmd_chain import Session, _require_model, open_session, role_config, unlock
from pmn.config import HolderConfig
from pmn.errors import CLIError

MAX_NEW_TOKENS = 256  # node.services.inference.InferenceConfig.max_new_tokens: the most a head serves per request


def _bytes32(flag: str, value: str) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise CLIError(f"{flag} must be 32 bytes of hex (0x + 64 hex digits), got {value!r}")
    return raw


def _leaf(exc: BaseException) -> BaseException:
    """The single exception inside (nested) exception groups, or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _Payment:
    """The fee payment of one `pmn infer` run: through the holder's outbox (pmn/holder_outbox.py), or an
    earlier payment named by --tx-hash (and --request-id)."""

    def __init__(self, args: argparse.Namespace, session: Session, cfg: HolderConfig, fee: int) -> None:
        self.model, self.cfg, self.fee = args.model, cfg, fee
        self.deployment = session.client.deployment
        self.account: LocalAccount | None = None
        self.given: tuple[bytes, bytes] | None = None
        self.request_id: bytes | None = None
        if args.tx_hash is None:
            if args.request_id is not None:
                raise CLIError("--request-id needs --tx-hash: it names the request an earlier payment was made for")
            self.account = unlock(cfg, args)  # before dialling: a wrong password fails fast
            return
        tx_hash = _bytes32("--tx-hash", args.tx_hash)
        if args.request_id is not None:
            request_id = _bytes32("--request-id", args.request_id)
        else:
            found = session.client.payment(args.model, tx_hash)
            if found is None:
                raise CLIError(f"transaction 0x{tx_hash.hex()} is not a revenue deposit to model {args.model}: "
                               "pass the hash `pmn infer` printed, or leave out --tx-hash to pay now")
            request_id = found.request_id
        self.given = (request_id, tx_hash)

    def get(self) -> tuple[bytes, bytes]:
        """(request id, tx hash): the given payment, or one paid (or resumed, or reused) through the outbox.
        Blocking: run it in a thread (it opens and closes the outbox there)."""
        if self.given is not None:
            return self.given
        from pmn.holder_outbox import HolderOutbox

        assert self.account is not None
        with HolderOutbox(self.cfg, self.deployment, self.account) as outbox:
            paid = outbox.pay(self.model, self.fee)
        self.request_id = paid.request_id
        how = " (recorded by an earlier run: not paid again)" if paid.resumed else ""
        print(f"paid {paid.fee_wei} wei for request 0x{paid.request_id.hex()} in tx 0x{paid.tx_hash.hex()}{how}",
              file=sys.stderr)
        return paid.request_id, paid.tx_hash

    def mark_used(self, why: str) -> None:
        """The head served (or refused as served) the outbox's payment: a later run pays for a new request."""
        if self.account is None or self.request_id is None:
            return
        from pmn.holder_outbox import HolderOutbox

        with HolderOutbox(self.cfg, self.deployment, self.account) as outbox:
            outbox.mark_used(self.model, self.request_id, why)


def cmd_infer(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise CLIError("empty prompt: pass the text to continue, e.g. pmn infer --model 1 \"def main(\"")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise CLIError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}, got {args.max_new_tokens}")
    if args.timeout_s <= 0:
        raise CLIError(f"--timeout-s must be > 0, got {args.timeout_s}")
    cfg = role_config(HolderConfig, args)
    peers = args.bootstrap or cfg.bootstrap
    from node.net.host import parse_peer_addr  # libp2p and torch load only once the arguments are sane
    from node.services.inference import (
        InferenceError,
        check_request,
        generate,
        head_stream_opener,
        request_limits,
    )

    if not os.environ.get("PMN_DEBUG"):  # py-libp2p logs each failed dial attempt; the one-line error says it
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    from pmn.holder_outbox import quiet_outbox_log

    quiet_outbox_log()
    if not peers:
        raise CLIError("no stage peer: pass --bootstrap MULTIADDR of a stage-0 node (printed by `pmn node start`)")
    try:
        parse_peer_addr(peers[0])  # a malformed address fails here, before any fee is paid
    except Exception as exc:
        raise CLIError(f"--bootstrap {peers[0]!r} is not a peer multiaddr with /p2p/<peer id>: {exc}") from None
    with open_session(cfg) as session:
        _require_model(session.client, args.model)
        if session.client.total_supply(args.model) == 0:
            raise CLIError(f"model {args.model} has no share holders yet, so its revenue contract takes no fees: "
                           "inference opens once its first epoch has settled (see `pmn models`)")
        fee = session.client.get_model(args.model).terms.inference_fee_wei
        payment = _Payment(args, session, cfg, fee)
        prompt_ids = list(args.prompt.encode())
        paid: dict[str, bytes] = {}
        phase = ["dial"]  # dial -> check -> pay -> generate: what was under way when something failed

        async def run() -> None:
            async with head_stream_opener(peers[0]) as open_stream:
                with trio.fail_after(args.timeout_s):
                    stream = await open_stream()  # reach the head before paying
                    # and check the request against its limits: a request it would refuse is not paid for
                    phase[0] = "check"
                    check_request(await request_limits(stream), prompt_ids, args.max_new_tokens)

                async def reuse() -> Any:
                    return stream

                phase[0] = "pay"
                request_id, tx_hash = await trio.to_thread.run_sync(payment.get)
                paid.update(request_id=request_id, tx_hash=tx_hash)
                phase[0] = "generate"
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                sys.stdout.write(args.prompt)
                sys.stdout.flush()
                first = True
                with trio.fail_after(args.timeout_s):
                    async for token in generate(reuse, prompt_ids, request_id=request_id, tx_hash=tx_hash,
                                                max_new_tokens=args.max_new_tokens):
                        if first:  # the head has recorded the request as served: never reuse its payment
                            first = False
                            await trio.to_thread.run_sync(payment.mark_used, "served")
                        if token < 256:  # byte-level vocabulary; ids above are not text
                            sys.stdout.write(decoder.decode(bytes([token])))
                            sys.stdout.flush()
                sys.stdout.write(decoder.decode(b"", final=True) + "\n")
                sys.stdout.flush()

        try:
            trio.run(run)
        except BaseException as exc:  # trio wraps failures of the client host in exception groups
            leaf = _leaf(exc)
            if not isinstance(leaf, Exception) or isinstance(leaf, CLIError):
                raise leaf from None
            where = (f" (request 0x{paid['request_id'].hex()}, tx 0x{paid['tx_hash'].hex()})" if paid else
                     " (nothing was paid)")
            if phase[0] == "dial":
                reason = "no answer" if isinstance(leaf, trio.TooSlowError) else str(leaf) or type(leaf).__name__
                raise CLIError(f"cannot reach the stage peer {peers[0]} within {args.timeout_s} s: {reason}{where}; "
                               "check the peer is running and its address") from None
            if phase[0] == "check" and isinstance(leaf, InferenceError):
                raise CLIError(f"{leaf}{where}") from None
            if phase[0] == "generate" and isinstance(leaf, InferenceError) and "already served" in str(leaf):
                payment.mark_used("refused as already served")  # a re-run pays for a new request
            if phase[0] in ("check", "generate"):
                if isinstance(leaf, trio.TooSlowError):
                    raise CLIError(f"the stages sent no complete answer within {args.timeout_s} s{where}; "
                                   "raise --timeout-s") from None
                if isinstance(leaf, InferenceError):
                    raise CLIError(f"{leaf}{where}") from None
            raise leaf from None
        return 0
