"""Errors raised by the simulations package."""

from __future__ import annotations


class SimulationError(Exception):
    """Root of every error raised by `simulations`."""


class CalibrationError(SimulationError):
    """The calibration file is missing, malformed, or does not match the requested model."""


class PresetError(SimulationError):
    """An unknown scenario preset was requested."""


class ValidationDataError(SimulationError):
    """A measured benchmark result is missing or lacks the fields the comparison needs."""


class DeadlockError(SimulationError):
    """The simulated pipeline stopped making progress before finishing its steps."""
