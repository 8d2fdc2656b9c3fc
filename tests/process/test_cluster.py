"""docker-compose.yml and scripts/cluster describe one topology, and scripts/cluster runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from nextbest.client import NextbestClient
from nextbest.cluster import TOPOLOGY
from tests import envs
from tests.harness import ROOT, postgres_available, postgres_schema, wait_serving


def test_compose_file_is_valid_and_names_the_same_commands_as_scripts_cluster() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prometheus", *TOPOLOGY} <= set(services)
    for name, args in TOPOLOGY.items():
        assert services[name]["command"] == args, name
        port = args[args.index("--port") + 1]
        assert services[name]["ports"] == [f"{port}:{port}"]
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert services[name]["environment"]["NEXTBEST_DB"].startswith("postgresql+psycopg://")
    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"{n}:{a[a.index('--metrics-port') + 1]}" for n, a in TOPOLOGY.items()]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        r = subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.mark.postgres
def test_scripts_cluster_starts_the_learner_and_two_replicas(tmp_path: Path) -> None:
    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432; scripts/cluster not run")
    env = {**os.environ, "NEXTBEST_CLUSTER_DIR": str(tmp_path)}
    with postgres_schema() as url:
        r = subprocess.run([str(ROOT / "scripts" / "cluster"), "start", "--db", url], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        try:
            targets = [f"127.0.0.1:{a[a.index('--port') + 1]}" for a in TOPOLOGY.values()]
            for t in targets:
                wait_serving(t)
            with NextbestClient(targets[0]) as c:
                c.apply([envs.placement()])
            with NextbestClient(targets[1]) as c:
                import time

                deadline = time.monotonic() + 20
                while not c.placements():
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                assert c.choose("app_home_banner", {"segment": "youth"}).arm_id in envs.ARMS
        finally:
            r = subprocess.run([str(ROOT / "scripts" / "cluster"), "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert "stopped 3 processes" in r.stdout
