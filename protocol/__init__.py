"""Verified contribution accounting for Protocol Models.

accounting (compute units, versioned hash) · receipts (EIP-712 hop receipts) · store (sqlite) ·
merkle (OpenZeppelin-compatible tree) · epoch (crediting rule, roots, receipts file, verify) ·
spotcheck (deterministic re-execution, sampling, fraud evidence) · audit_sampling (which stage and hops
an attester may audit, checked by nodes) · aggregation (robust replica
averaging) · settlement (chain submission) · localswarm (in-process signed-hop pipeline) ·
payments (chain-backed key registry and payment checks).
"""
