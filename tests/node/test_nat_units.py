"""Pure parts of the NAT subsystem: config checks, address helpers, relay limits, status rows."""

from __future__ import annotations

from typing import Any

import pytest

from node.config import NatConfig, NodeConfig
from node.net.nat.paths import is_circuit
from node.net.nat.relay import relay_limits
from pmn.cmd_node import nat_rows


def test_config_defaults_validate_and_bad_fields_are_named() -> None:
    NodeConfig().validate()
    for field, value in (("reachability", "maybe"), ("holepunch_timeout_s", 0), ("max_relays", 0),
                         ("reservation_renew_fraction", 1.0), ("relay_circuit_bytes", 0),
                         ("holepunch_io_timeout_s", 0), ("holepunch_dial_timeout_s", 0)):
        change: dict[str, Any] = {field: value}
        cfg = NatConfig(**change)
        with pytest.raises(ValueError, match=field):
            cfg.validate()


def test_relay_limits_do_not_cap_a_training_run() -> None:
    lim = relay_limits(NatConfig())
    assert lim.duration == 0  # no time cap on a relayed connection
    assert lim.data >= 1 << 40  # relay v2's default (1 GiB) would be crossed within a run
    assert lim.max_reservations == NatConfig().relay_max_reservations


def test_is_circuit() -> None:
    assert is_circuit("/ip4/198.18.0.1/tcp/1/p2p/12D3KooWA/p2p-circuit/p2p/12D3KooWB")
    assert not is_circuit("/ip4/198.18.0.1/tcp/1/p2p/12D3KooWA")


def test_status_rows_name_reachability_relays_refusals_and_paths() -> None:
    rows = dict(nat_rows({"reachability": "private", "reason": "1 peer(s) could not dial us back",
                          "relay_service": False, "relays": ["12D3KooWRelay"],
                          "relay_refused": {"12D3KooWOtherRelay": "refused: RESOURCE_LIMIT_EXCEEDED"},
                          "peers": {"12D3KooWPeerAAAAAAAA": "relayed", "12D3KooWPeerBBBBBBBB": "direct (hole punched)"},
                          "holepunch": {"12D3KooWPeerAAAAAAAA": "punch timed out after holepunch_timeout_s=5"}}))
    assert rows["reachability"] == "private (1 peer(s) could not dial us back)"
    assert rows["relays"] == "12D3KooWRelay"
    assert "RESOURCE_LIMIT_EXCEEDED" in rows["relay 12D3KooWOtherRel..."]
    assert rows["peer 12D3KooWPeerAAAA..."] == "relayed (hole punch: punch timed out after holepunch_timeout_s=5)"
    assert rows["peer 12D3KooWPeerBBBB..."] == "direct (hole punched)"
    assert nat_rows(None) == []
