"""The server address of the commands that call one: ``--target``, else ``$NEXTBEST_TARGET``,
else 127.0.0.1:50051. One definition, so that every command says and does the same."""

from __future__ import annotations

import argparse
import os

ENV = "NEXTBEST_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"
HELP = f"server address HOST:PORT (default ${ENV}, else {DEFAULT_TARGET})"


def env_target() -> str | None:
    """``$NEXTBEST_TARGET`` when set and not empty."""
    return os.environ.get(ENV) or None


def default_target() -> str:
    """What ``--target`` defaults to: ``$NEXTBEST_TARGET``, else 127.0.0.1:50051."""
    return env_target() or DEFAULT_TARGET


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--target`` with its default read when the parser is built (each run of the command)."""
    parser.add_argument("--target", default=default_target(), help=HELP)
