"""Pure parts of the NAT subsystem: config checks, address helpers, relay limits, status rows."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

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


class _NoNetwork:
    """A host with no connections (`peer_path` reads `get_network().connections`)."""

    connections: dict[Any, Any] = {}

    def get_network(self) -> _NoNetwork:
        return self


class _SlowDCUtR:
    """DCUtR's exchange as far as the puncher sees it: it ends (unsuccessfully) after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def initiate_hole_punch(self, peer: Any) -> bool:
        await trio.sleep(self.seconds)
        return False


def test_settle_waits_for_the_dial_so_the_last_status_names_the_timed_out_punch() -> None:
    """A run can end while the dial that opened its relayed connection still waits on the punch: `settle` gives
    that wait its bound, so the status written next says "punch timed out" (and not nothing)."""
    from libp2p.peer.id import ID

    from node.net.nat.holepunch import HolePuncher

    peer = ID.from_base58("12D3KooWQZoK3q2WRweHbedVmt6ehCi4MRHnA5gmr5L7YiRmR8Ys")
    cfg = NatConfig(holepunch_timeout_s=0.5, holepunch_retries=0)

    async def main() -> tuple[dict[str, str], dict[str, str], bool | None]:
        puncher = HolePuncher(_NoNetwork(), cfg, _SlowDCUtR(2.0))  # type: ignore[arg-type]
        dialed: list[bool] = []
        async with trio.open_nursery() as nursery:
            puncher.nursery = nursery
            nursery.start_soon(lambda: _dial(puncher, peer, dialed))
            await trio.testing.wait_all_tasks_blocked()
            before = puncher.outcomes()  # the dial still waits: nothing to report yet
            await puncher.settle()
            after = puncher.outcomes()
            nursery.cancel_scope.cancel()
        return before, after, dialed[0] if dialed else None

    before, after, ok = trio.run(main)
    assert before == {}
    assert after == {peer.pretty(): "punch timed out after holepunch_timeout_s=0.5 (still relayed)"}
    assert ok is False


async def _dial(puncher: Any, peer: Any, out: list[bool]) -> None:
    out.append(await puncher.attempt(peer))


def test_a_cancelled_dial_still_records_that_its_punch_timed_out() -> None:
    from libp2p.peer.id import ID

    from node.net.nat.holepunch import HolePuncher

    peer = ID.from_base58("12D3KooWQZoK3q2WRweHbedVmt6ehCi4MRHnA5gmr5L7YiRmR8Ys")

    async def main() -> dict[str, str]:
        puncher = HolePuncher(_NoNetwork(), NatConfig(holepunch_timeout_s=5.0), _SlowDCUtR(10.0))  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            puncher.nursery = nursery
            with trio.move_on_after(0.1):  # the dial's own deadline, shorter than the punch's
                await puncher.attempt(peer)
            out = puncher.outcomes()
            await puncher.settle()  # nothing waits any more: returns at once
            nursery.cancel_scope.cancel()
        return out

    assert trio.run(main) == {peer.pretty(): "punch timed out after holepunch_timeout_s=5.0 (still relayed)"}
