"""The cluster topology of docker-compose.yml, run as local processes (scripts/cluster).

One definition serves both: the compose file names the same commands and flags (a test checks
it), so what runs on a laptop is what runs in containers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# name -> arguments of `nextbest`; ports are the gRPC port and the metrics port.
TOPOLOGY: dict[str, list[str]] = {
    "learner": ["serve", "--host", "0.0.0.0", "--port", "50061", "--learner", "always", "--metrics-port", "9161"],
    "replica1": ["serve", "--host", "0.0.0.0", "--port", "50062", "--learner", "auto", "--metrics-port", "9162"],
    "replica2": ["serve", "--host", "0.0.0.0", "--port", "50063", "--learner", "auto", "--metrics-port", "9163"],
}


def _state_dir() -> Path:
    d = Path(os.environ.get("NEXTBEST_CLUSTER_DIR", Path(tempfile.gettempdir()) / "nextbest-cluster"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def start(db: str) -> dict[str, int]:
    """Start every process of the topology against ``db``; returns their pids."""
    state = _state_dir()
    pids: dict[str, int] = {}
    for name, args in TOPOLOGY.items():
        log = open(state / f"{name}.log", "w")
        p = subprocess.Popen(
            [sys.executable, "-m", "nextbest.cli.main", *args, "--db", db],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pids[name] = p.pid
        if name == "learner":
            time.sleep(1.0)  # let the learner take the learner lock first
    (state / "pids.json").write_text(json.dumps(pids))
    return pids


def stop() -> int:
    """SIGTERM every process and wait for it; returns how many were running."""
    path = _state_dir() / "pids.json"
    if not path.exists():
        return 0
    pids: dict[str, int] = json.loads(path.read_text())
    running = 0
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGTERM)
            running += 1
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for pid in pids.values():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    path.unlink()
    return running


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__)
    p.add_argument("action", choices=["start", "stop", "print"])
    p.add_argument("--db", default=os.environ.get("NEXTBEST_DB", DEFAULT_DB))
    a = p.parse_args(argv)
    if a.action == "print":
        print(json.dumps(TOPOLOGY, indent=2))
    elif a.action == "start":
        pids = start(a.db)
        for name, args in TOPOLOGY.items():
            print(f"{name:<9} pid {pids[name]:<7} 127.0.0.1:{args[args.index('--port') + 1]}  log {_state_dir() / (name + '.log')}")
    else:
        print(f"stopped {stop()} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
