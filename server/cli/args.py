"""Argument types the nextbest subcommands share (argparse ``type=``): one wording everywhere."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number of at least 1 (events, rows, batch sizes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


def positive_float(text: str) -> float:
    """A number above 0 (seconds, rates)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value
