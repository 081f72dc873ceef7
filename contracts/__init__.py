"""On-chain layer: Solidity sources (src/), committed artifacts (build/) and the web3.py client.

Modules (import what you need; nothing heavy is imported here):
- `contracts.build`: `build(check=False)` recompiles src/**/*.sol with solc-js; `load_artifact(name)`.
- `contracts.chain`: `connect(url | None, ChainConfig)`, `test_accounts`, `advance_time`.
- `contracts.embedded`: `serve_embedded(w3, host, port) -> (url, stop)`.
- `contracts.deploy`: `deploy_all(...) -> Deployment`; `Deployment.save/load`.
- `contracts.client`: `ProtocolContracts(w3, deployment, config)`, typed calls of every contract.
- `contracts.eip712`: Registration / EpochRoot / Fraud typed data, signing, Merkle leaf hash.
- `contracts.merkle`: `ContributionTree` (OpenZeppelin-compatible).
- `contracts.errors`: `ContractsError` and its subclasses.
"""
