"""Writes replay_golden.json: the estimates of the in-memory replay that came before the
streaming one, on the log of tests/offline/replay_log.py, from SQLite and from its DSJSON
export. It ran once, on that code (commit ff9019b's bandit/offline/{estimators,replay}.py
and server/offline/log_source.py, loaded from files given as arguments), with one change: the
slot as the last key of the log's order, which that code left to the database's plan (it read
slot 1 of a two-slot event before slot 0 in 264 of 1,385 events). The streaming replay must keep
reproducing these values (tests/offline/test_streaming_replay.py).

    python tests/offline/data/make_replay_golden.py OLD_DIR   # OLD_DIR holds old_est.py, old_replay.py, old_ls.py
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, sys.argv[1])
import old_ls  # type: ignore[import-not-found]
import old_replay  # type: ignore[import-not-found]

from tests.offline import replay_log as rl

POLICIES = ["logged", "uniform", "constant:a", "constant:c", "vw:--cb_explore_adf --epsilon 0.1 -q UA"]

d = tempfile.mkdtemp()
url = f"sqlite:///{d}/g.db"
rl.write(url, 1200)
out = {}
log = old_ls.read_replay_log(url, rl.PLACEMENT, with_features=True)
out["db"] = [r.to_dict() for r in old_replay.evaluate(log, [old_replay.parse_policy(p) for p in POLICIES], ["ips", "snips", "dr"])]
decisions, arms = old_ls.read_decisions(url, rl.PLACEMENT)
old_ls.write_dsjson(f"{d}/g.dsjson", decisions, arms)
log = old_ls.read_dsjson(f"{d}/g.dsjson", rl.PLACEMENT)
out["dsjson"] = [r.to_dict() for r in old_replay.evaluate(log, [old_replay.parse_policy(p) for p in POLICIES], ["ips", "snips", "dr"])]
Path(__file__).with_name("replay_golden.json").write_text(json.dumps(out, indent=1) + "\n")
