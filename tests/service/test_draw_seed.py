"""The per-event draws are unpredictable by default: with no seed configured, the server salts
them with a random secret made once per database (server_secrets, migration 0007), which every
server on that database and every restart reads back. A configured seed still wins."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from nextbest.bandit.spec import PlacementSpec
from nextbest.engine.chooser import placement_salt, uniform_for
from nextbest.engine.engine import DRAW_SEED
from nextbest.storage.sql import open_store
from tests.harness import ServerThread, make_settings

# "a" is the greedy arm (its business value), so the pmf is (0.8, 0.1, 0.1) until anything is learned.
SPEC = PlacementSpec.model_validate(
    {
        "id": "p",
        "exploration": {"algorithm": "epsilon", "epsilon": 0.3},
        "arms": [{"id": "a", "business_value": 1.0}, {"id": "b"}, {"id": "c"}],
    }
)


def test_servers_on_one_database_share_the_secret_seed_and_a_fresh_database_gets_its_own(any_db: str, tmp_path: Path) -> None:
    servers: list[ServerThread] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()  # two servers starting at once on a database without a secret
        servers.append(ServerThread(make_settings(any_db)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        first, second = (s.engine.seed for s in servers)
        assert first == second and len(first) == 64 and int(first, 16) >= 0  # secrets.token_hex(32)
        with servers[0].client() as c:
            c.apply([SPEC])
            c.choose("p", {}, event_id="e1")
            servers[0].call(servers[0].engine.writer.flush())
        before = servers[0].engine.store.find_decision("e1")
    finally:
        for s in servers:
            s.stop()
    again = ServerThread(make_settings(any_db))  # a restart reads it back: the same draw
    try:
        assert again.engine.seed == first
        assert again.engine.states["p"].salt == placement_salt(first, "p")
    finally:
        again.stop()
    store = open_store(any_db)
    try:
        assert store.shared_secret(DRAW_SEED, "not this") == first
    finally:
        store.close()
    assert before is not None and before.probability > 0  # replay keeps using the logged propensities
    fresh = ServerThread(make_settings(f"sqlite:///{tmp_path}/other.db"))
    try:
        assert fresh.engine.seed not in ("", first) and len(fresh.engine.seed) == 64
    finally:
        fresh.stop()
    configured = ServerThread(make_settings(f"sqlite:///{tmp_path}/other.db", seed="mine"))
    try:
        assert configured.engine.seed == "mine"  # a configured seed still wins
    finally:
        configured.stop()


def _served_as_planned(server: ServerThread, seed_guess: str) -> int:
    """A caller who knows the pmf and guesses the seed picks 100 event ids whose draw should
    serve the least likely arm; how many of them do serve it."""
    with server.client() as c:
        c.apply([SPEC])
        c.choose("p", {}, event_id="probe")
        server.call(server.engine.writer.flush())
        d = server.engine.store.find_decision("probe")
        assert d is not None
        pmf = np.array(d.pmf)
        assert np.allclose(pmf, [0.8, 0.1, 0.1])
        wanted = int(np.argmin(pmf))
        cdf = np.cumsum(pmf)
        salt = placement_salt(seed_guess, "p")
        ids: list[str] = []
        k = 0
        while len(ids) < 100:
            eid = f"chosen-{k}"
            k += 1
            if int(np.searchsorted(cdf, uniform_for(salt, eid) * cdf[-1], side="right")) == wanted:
                ids.append(eid)
        target = d.arms[wanted][0]
        return sum(c.choose("p", {}, event_id=eid).arm_id == target for eid in ids)


def test_a_caller_can_no_longer_compute_the_draw_of_an_event_id_it_chooses(tmp_path: Path) -> None:
    known = ServerThread(make_settings(f"sqlite:///{tmp_path}/known.db", seed="public"))
    try:
        assert _served_as_planned(known, "public") == 100  # the attack works when the seed is known
    finally:
        known.stop()
    default = ServerThread(make_settings(f"sqlite:///{tmp_path}/default.db"))  # seed: "" (the default)
    try:
        served = _served_as_planned(default, "")  # the old default's draws: seed ""
    finally:
        default.stop()
    assert served < 30, served  # about 10 (p = 0.1): chance, not the caller's choice
