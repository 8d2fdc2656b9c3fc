"""The delayed-feedback simulation behind the README's learning-order table (nextbest.bandit.sim.delayed)."""

from __future__ import annotations

from nextbest.bandit.sim import delayed


def test_unweighted_updates_learned_at_the_close_keep_up_and_success_only_at_once_does_not() -> None:
    at_close = delayed.run("at_close", weighted=False, seed=1, rounds=2500)
    at_reward = delayed.run("at_reward", weighted=False, seed=1, rounds=2500)
    weighted_close = delayed.run("at_close", weighted=True, seed=1, rounds=2500)
    successes_at_once = delayed.run("successes_at_once", weighted=False, seed=1, rounds=2500)
    assert at_close > 0.6 and at_reward > 0.6  # learned: uniform earns 0.3, the oracle 0.7
    assert at_close >= 0.97 * at_reward  # learning at the close costs (almost) nothing
    assert weighted_close < at_close  # weighted steps hurt under a delay
    assert successes_at_once < at_close  # successes learned ahead of their failures hurt too


def test_the_table_has_a_row_per_reporting_and_the_cli_prints_it(capsys) -> None:  # type: ignore[no-untyped-def]
    assert delayed.main(["--seeds", "1", "--rounds", "1100", "--delay", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("squarecb, window 50 decisions") and len(out) == 2 + len(delayed.ROWS)
    rows = [line.split() for line in out[2:]]
    assert rows[1][-2:] == rows[3][-2:]  # successes only at the close is every outcome at the close
