"""Connection, deployment files, configuration, and the embedded chain served over HTTP."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from eth_account import Account

from contracts.chain import connect
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import Deployment
from contracts.embedded import serve_embedded
from contracts.errors import ChainUnavailableError, ContractRevertError, DeploymentError

from .conftest import FAST, Env


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
def test_unreachable_endpoint_names_url_and_attempts() -> None:
    url = f"http://127.0.0.1:{_dead_port()}"
    cfg = ChainConfig(connect_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, request_timeout_s=1)
    with pytest.raises(ChainUnavailableError) as err:
        connect(url, cfg)
    assert err.value.url == url and err.value.attempts == 3
    assert url in str(err.value) and "3 attempt" in str(err.value)
    # one line with the cause in plain words, not the nested reprs of requests and urllib3
    assert str(err.value).endswith("Connection refused") and "MaxRetryError" not in str(err.value)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="connect_attempts"):
        ChainConfig(connect_attempts=0).validate()
    with pytest.raises(ValueError, match="fixed_gas"):
        ChainConfig(fixed_gas=5).validate()
    assert ChainConfig(backoff_initial_s=1, backoff_factor=2, backoff_max_s=3).backoff_s(3) == 3


def test_deployment_file_round_trip_and_checks(env: Env, tmp_path) -> None:
    path = tmp_path / "deployment.json"
    env.pc.deployment.save(path)
    loaded = Deployment.load(path)
    assert loaded == env.pc.deployment
    loaded.check_chain(env.pc.w3)
    pc2 = ProtocolContracts(env.pc.w3, loaded, FAST)
    assert pc2.quorum_size() == 2 and pc2.is_validator(env.validators[0].address)
    data = json.loads(path.read_text())
    del data["addresses"]["ContributionLedger"]
    path.write_text(json.dumps(data))
    with pytest.raises(DeploymentError, match="ContributionLedger"):
        Deployment.load(path)
    with pytest.raises(DeploymentError, match="does not exist"):
        Deployment.load(tmp_path / "nope.json")
    wrong = Deployment(env.pc.chain_id + 1, {}, {})
    with pytest.raises(DeploymentError, match="deployment is for chain"):
        wrong.check_chain(env.pc.w3)


@pytest.mark.timeout(60)
def test_served_embedded_chain_shares_state(env: Env) -> None:
    mid = env.propose()
    url, stop = serve_embedded(env.pc.w3)
    try:
        remote = ProtocolContracts(connect(url, FAST), env.pc.deployment, FAST)
        assert remote.get_model(mid).status == "Training"
        key = Account.create()
        remote.register_node(env.operators[0], key, 4)
        assert env.pc.node_info(key.address).capacity == 4
        with pytest.raises(ContractRevertError, match="NodeRegistryAlreadyRegistered"):
            remote.register_node(env.operators[1], key, 4)
        t0 = remote.w3.eth.get_block("latest")["timestamp"]
        assert remote.advance_time(500) >= t0 + 500
        assert env.pc.w3.eth.get_block("latest")["timestamp"] >= t0 + 500
    finally:
        stop()
    with pytest.raises(ChainUnavailableError):
        connect(url, ChainConfig(connect_attempts=1))


@pytest.mark.timeout(120)
def test_served_chain_survives_concurrent_local_and_remote_senders(env: Env) -> None:
    mid = env.propose()
    node = env.new_node(env.operators[0]).address
    env.settle_and_claim(mid, 0, {node: 100})
    url, stop = serve_embedded(env.pc.w3)
    errors: list[BaseException] = []
    try:
        remote = ProtocolContracts(connect(url, FAST), env.pc.deployment, FAST)

        def send(pc: ProtocolContracts, to: str) -> None:
            try:
                for _ in range(4):
                    pc.transfer(env.operators[0], mid, to, 1)
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(env.pc, env.payer.address)),
                   threading.Thread(target=send, args=(remote, env.researcher.address))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop()
    assert errors == []
    assert env.pc.balance_of(mid, env.payer.address) == 4 and env.pc.balance_of(mid, env.researcher.address) == 4
    assert env.pc.balance_of(mid, env.operators[0].address) == 92


def test_node_rejections_that_mean_a_taken_nonce_are_nonce_conflicts() -> None:
    from contracts.tx import _is_nonce_conflict

    assert _is_nonce_conflict("{'code': -32003, 'message': 'nonce too low'}")
    assert _is_nonce_conflict("{'code': -32003, 'message': 'replacement transaction underpriced'}")
    assert not _is_nonce_conflict("{'code': -32003, 'message': 'transaction underpriced'}")
    assert not _is_nonce_conflict("insufficient funds for gas * price + value")


class _SlowRpc:
    """A JSON-RPC endpoint on a real socket that answers `eth_chainId` and counts connections; while `release`
    is clear it holds each answer until the test sets it (at most `hold_s`)."""

    def __init__(self, hold_s: float) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        rpc = self
        self.connections = 0
        self.started = threading.Event()  # a request reached the handler
        self.release = threading.Event()  # answers go out at once while set
        self.release.set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real RPC node

            def setup(self) -> None:
                rpc.connections += 1
                super().setup()

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                rpc.started.set()
                rpc.release.wait(hold_s)
                body = json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": "0x7a69"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()  # a held answer goes out: its handler thread ends
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.mark.timeout(30)
def test_closed_chain_connection_refuses_requests_and_a_racing_request_leaves_no_socket() -> None:
    import gc
    import warnings

    import requests
    from web3 import Web3

    from contracts.chain import ClosableHTTPProvider, disconnect

    rpc = _SlowRpc(hold_s=10)
    try:
        w3 = Web3(ClosableHTTPProvider(rpc.url, request_kwargs={"timeout": 10}))
        assert w3.eth.chain_id == 31337 and rpc.connections == 1
        disconnect(w3)
        # a chain read left running in an abandoned worker thread, started after the node closed its link
        with pytest.raises(requests.exceptions.ConnectionError, match="the chain connection was closed"):
            _ = w3.eth.chain_id
        assert rpc.connections == 1  # refused before any dial
        # a read that was already on the wire when the link closed: it returns, and its socket is closed
        w3 = Web3(ClosableHTTPProvider(rpc.url, request_kwargs={"timeout": 10}))
        answers: list[int] = []
        reader = threading.Thread(target=lambda w=w3: answers.append(w.eth.chain_id))
        rpc.started.clear()  # set again when the reader's request reaches the endpoint
        rpc.release.clear()  # the answer waits until the link is closed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            reader.start()
            assert rpc.started.wait(10)
            disconnect(w3)
            rpc.release.set()
            reader.join(timeout=10)
            del reader, w3
            gc.collect()
        assert answers == [31337]
        assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    finally:
        rpc.stop()
