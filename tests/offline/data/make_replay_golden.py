"""Writes replay_golden.json: the estimates of the in-memory replay (before streaming) on
the log of tests/offline/replay_log.py, from SQLite and from its DSJSON export. Run once, with the code
of commit that introduced it; the streaming replay must keep reproducing these values."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.offline import replay_log as rl
from nextbest.offline.log_source import read_replay_log, read_dsjson, read_decisions, write_dsjson
from nextbest.bandit.offline.replay import evaluate, parse_policy
import tempfile
d = tempfile.mkdtemp()
url = f"sqlite:///{d}/g.db"
rl.write(url, 1200)
pols = ["logged", "uniform", "constant:a", "constant:c", "vw:--cb_explore_adf --epsilon 0.1 -q UA"]
out = {}
log = read_replay_log(url, rl.PLACEMENT, with_features=True)
print(log.n, int((log.chosen < 0).sum()))
out["db"] = [r.to_dict() for r in evaluate(log, [parse_policy(p) for p in pols], ["ips", "snips", "dr"])]
decs, arms = read_decisions(url, rl.PLACEMENT)
write_dsjson(f"{d}/g.dsjson", decs, arms)
log2 = read_dsjson(f"{d}/g.dsjson", rl.PLACEMENT)
print(log2.n)
out["dsjson"] = [r.to_dict() for r in evaluate(log2, [parse_policy(p) for p in pols], ["ips", "snips", "dr"])]
Path(__file__).with_name("replay_golden.json").write_text(json.dumps(out, indent=1) + "\n")
for r in out["db"]: print(r["policy"], r["estimator"], r["value"], r["warnings"][:1])
