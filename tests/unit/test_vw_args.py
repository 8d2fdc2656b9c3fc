"""vw_args is an allow list of learning options: nothing in it can read or write a file."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import arm_line, feature, shared_line
from nextbest.bandit.model import CbModel, check_vw_arguments
from nextbest.bandit.offline.policies import parse_policy
from nextbest.bandit.spec import PlacementSpec, check_vw_args
from nextbest.bandit.vw_options import check_tokens, split_vw_args
from nextbest.cli import main as cli
from nextbest.v1 import admin_pb2
from tests import envs
from tests.harness import ServerThread


@pytest.mark.parametrize(
    "args, named, why",
    [
        ("-f/tmp/x", "-f", "reads or writes files"),
        ("-f /tmp/x", "-f", "reads or writes files"),
        ("--final_regressor=/tmp/x", "--final_regressor", "reads or writes files"),
        ("-i/etc/passwd", "-i", "reads or writes files"),
        ("--extra_metrics /tmp/m", "--extra_metrics", "reads or writes files"),
        ("--readable_model /tmp/r", "--readable_model", "reads or writes files"),
        ("--invert_hash x", "--invert_hash", "reads or writes files"),
        ("-d x", "-d", "reads or writes files"),
        ("--data=x", "--data", "reads or writes files"),
        ("--l2 0.1 -f/tmp/x", "-f", "reads or writes files"),
        ("--cb_explore_adf", "--cb_explore_adf", "is set by nextbest"),
        ("-b 20", "-b", "is set by nextbest"),
        ("-b20", "-b", "is set by nextbest"),
        ("--unknown_option", "--unknown_option", "not an allowed learning option"),
        ("--bits 40", "--bits", "not an allowed learning option"),
        ("foo", "foo", "a value without an option"),
        ("--l2 nan", "--l2", "finite number"),
        ("--l2 inf", "--l2", "finite number"),
        ("-l=0.5", "-l", "number"),
        ("--cb_type bogus", "--cb_type", "one of"),
        ("-q ::", "-q", "namespace letters"),
        ("--adaptive=1", "--adaptive", "takes no value"),
        ("--l2", "--l2", "needs a value"),
        ("--l2=' 1 '", "1", "spaces"),  # float() takes it; VW would see other tokens than checked
        ("--l2 1_0", "--l2", "finite number"),
        ("--nn 100000000", "--nn", "from 0 to 64"),
    ],
)
def test_vw_args_outside_the_allow_list_are_refused_naming_the_option(args: str, named: str, why: str) -> None:
    with pytest.raises(ValueError) as e:
        check_vw_args(args)
    assert named in str(e.value) and why in str(e.value)
    with pytest.raises(ValidationError, match="vw_args"):
        envs.placement(vw_args=args)


@pytest.mark.parametrize(
    "args",
    ["--cb_type dr -l 0.5", "-l0.5", "--learning_rate=0.1 --l2 1e-6", "-q UA", "--power_t 0", "--cb_type mtr", "-qUA --min_prediction -1"],
)
def test_allowed_learning_options_build_a_model_that_scores_arms(args: str) -> None:
    spec = envs.placement(vw_args=args)
    check_vw_arguments(spec)
    model = CbModel(spec)
    try:
        shared = shared_line([feature("customer", "segment", "youth")])
        arms = [arm_line(a.id, a.vw_features()) for a in spec.arms]
        model.learn(shared, arms, 0, 1.0)
        scores = model.expected_rewards(shared, arms)
        assert scores.shape == (len(arms),) and np.isfinite(scores).all()
    finally:
        model.close()


def test_every_allowed_option_builds_a_workspace() -> None:
    """The allow list holds only options this VW accepts next to ``--cb_adf``."""
    samples = {"float": "0.5", "int": "3", "spec": "UA"}
    from nextbest.bandit.vw_options import LEARNING_OPTIONS

    for name, opt in LEARNING_OPTIONS.items():
        values = sorted(opt.choices) if opt.kind == "choice" else [samples.get(opt.kind, "")]
        for value in values:
            args = f"{name} {'UAA' if name == '--cubic' else value}".strip()
            if name == "--quantile_tau":
                args = f"--loss_function quantile {args}"
            check_vw_arguments(envs.placement(vw_args=args))


def test_the_tokens_are_kept_as_written() -> None:
    assert split_vw_args("--cb_type dr  -l0.5 --l2=1e-6") == ["--cb_type", "dr", "-l0.5", "--l2=1e-6"]
    assert check_tokens([]) == []


def test_model_validation_refuses_file_options_even_if_they_slipped_through(tmp_path: Path) -> None:
    target = tmp_path / "m"
    spec = envs.placement().model_copy(update={"vw_args": f"-f{target}"})  # skips validation
    with pytest.raises(InvalidInput, match="-f: reads or writes files"):
        check_vw_arguments(spec)
    assert not target.exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_applying_a_file_option_is_refused_and_writes_no_file(server: ServerThread, tmp_path: Path, dry_run: bool) -> None:
    target = tmp_path / "m"
    bad = admin_pb2.Placement(id="p", arms=[admin_pb2.Arm(id="a")], vw_args=f"-f{target}")
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.admin.ApplyConfig(admin_pb2.ApplyConfigRequest(placements=[bad], dry_run=dry_run))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "-f: reads or writes files" in e.value.details()  # type: ignore[attr-defined]
        assert c.placements() == []
    assert not target.exists()


def test_apply_cli_refuses_a_file_option_before_any_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "m"
    path = tmp_path / "apply.yaml"
    path.write_text(f'placements:\n  - id: p\n    vw_args: "-f{target}"\n    arms:\n      - id: a\n')
    assert cli.main(["apply", "--dry-run", "--target", "127.0.0.1:1", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "-f: reads or writes files" in err and "Traceback" not in err
    assert not target.exists()


def test_replay_policies_use_the_same_allow_list() -> None:
    parse_policy("vw:--cb_explore_adf --epsilon 0.1 -q UA")
    for spec, named in [
        ("vw:--cb_adf -f/tmp/x", "-f"),
        ("vw:--cb_adf --extra_metrics /tmp/m", "--extra_metrics"),
        ("vw:-i/etc/passwd", "-i"),
    ]:
        with pytest.raises(InvalidInput, match=f"{named}: reads or writes files") as e:
            parse_policy(spec)
        assert e.value.field == "policy"


def test_a_non_utf8_apply_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "apply.yaml"
    path.write_bytes(b"placements:\n  - id: caf\xe9\n")
    for argv in (["apply", str(path)], ["apply", "--dry-run", str(path)]):
        assert cli.main([*argv[:-1], "--target", "127.0.0.1:1", argv[-1]]) == 2
        out = capsys.readouterr()
        assert f"{path}:2: not UTF-8 text (byte 0xe9 at offset 23)" in out.err
        assert "Traceback" not in out.out + out.err


def test_placement_spec_keeps_the_joined_tokens() -> None:
    assert PlacementSpec.model_validate({"id": "p", "vw_args": " --cb_type  dr "}).vw_args == "--cb_type dr"
