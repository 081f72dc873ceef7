"""Errors of the NAT subsystem: one root (`NatError`, a NodeError), one subclass per failure."""

from __future__ import annotations

from node.errors import NodeError


class NatError(NodeError):
    """Root of the NAT subsystem's errors."""


class ReservationRefusedError(NatError):
    """A relay answered a reservation request with a status other than OK (`status` names it)."""

    def __init__(self, relay: str, status: str) -> None:
        super().__init__(f"relay {relay} refused the reservation: {status}")
        self.relay = relay
        self.status = status


class RelayUnreachableError(NatError):
    """A relay could not be connected to, or did not answer in time."""


class CircuitDialError(NatError):
    """A peer announcing relayed addresses could be reached neither directly nor through any of its relays."""


class HolePunchError(NatError):
    """A DCUtR attempt did not yield a direct connection (timeout, refusal, no usable address)."""
