"""``--target`` of every command that calls a server: given, else $NEXTBEST_TARGET, else 127.0.0.1:50051."""

from __future__ import annotations

import pytest

from nextbest.cli.main import build_parser, main
from nextbest.cli.target import DEFAULT_TARGET, ENV

# Every command with --target, as the arguments it needs besides.
COMMANDS = [
    ["apply", "plan.yaml"],
    ["stats", "app_home_banner"],
    ["choose", "app_home_banner"],
    ["reward", "e1", "1"],
    ["explain", "e1"],
    ["export"],
    ["simulate"],
]
# These write to a database (--db) or go through a server (--target): exactly one.
EITHER = [["profiles", "load", "extract.csv"], ["profiles", "get", "c42"], ["conversions", "load", "billing.csv"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_the_variable_is_the_default_and_the_option_wins(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert build_parser().parse_args(argv).target == DEFAULT_TARGET == "127.0.0.1:50051"
    monkeypatch.setenv(ENV, "nextbest.internal:443")
    assert build_parser().parse_args(argv).target == "nextbest.internal:443"
    assert build_parser().parse_args([*argv, "--target", "10.0.0.7:50051"]).target == "10.0.0.7:50051"
    monkeypatch.setenv(ENV, "")  # set but empty: as unset
    assert build_parser().parse_args(argv).target == DEFAULT_TARGET


@pytest.mark.parametrize("argv", EITHER, ids=lambda a: " ".join(a[:2]))
def test_the_variable_counts_as_target_where_db_is_the_other_choice(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "nextbest.internal:443")
    args = build_parser().parse_args(argv)
    assert (args.target, args.db) == ("nextbest.internal:443", None)
    args = build_parser().parse_args([*argv, "--db", "sqlite:///nb.db"])  # --db given: the variable stays out of it
    assert args.db == "sqlite:///nb.db"
    assert build_parser().parse_args([*argv, "--target", "10.0.0.7:50051"]).target == "10.0.0.7:50051"


@pytest.mark.parametrize("argv", EITHER, ids=lambda a: " ".join(a[:2]))
def test_without_the_variable_one_of_db_and_target_is_still_required(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: one of the arguments" in err and "--db" in err and "--target" in err and "is required" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--db", "sqlite:///nb.db", "--target", "10.0.0.7:50051"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert build_parser().parse_args([*argv, "--target", "10.0.0.7:50051"]).target == "10.0.0.7:50051"


@pytest.mark.parametrize("argv", [*COMMANDS, *EITHER], ids=lambda a: " ".join(a[:2]))
def test_the_help_names_the_variable(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    command = argv[:2] if argv[0] in ("profiles", "conversions") else argv[:1]
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "$NEXTBEST_TARGET" in " ".join(capsys.readouterr().out.split())
