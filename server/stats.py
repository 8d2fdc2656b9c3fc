"""Statistics values shared by the engine and the adapters."""

from __future__ import annotations

from dataclasses import dataclass

from server.storage.base import ArmTally


@dataclass(frozen=True, slots=True)
class Stats:
    """A placement's statistics, per arm in configuration order."""

    placement: str
    arms: list[tuple[ArmTally, bool]]  # (tally, active)
    decisions: int
    model_version: int
    pending: int
