"""Figures of ``nextbest bench``: each measured value with its ceiling, ratio and target.

A figure's ceiling is what the same measurement gives on the bare transport (gRPC echo) or
on raw VW, measured in the same run; the ratio is what to compare across machines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1 << 20
# The p99 target's point: 20 arms at 80 % of saturation (the benchmark runs it several times).
TARGET_POINT = (20, 0.8)
GIB = 1 << 30


@dataclass
class Figure:
    key: str
    label: str
    value: float
    unit: str
    ceilings: dict[str, float] = field(default_factory=dict)  # name -> value in the same unit
    target: str = ""
    met: bool | None = None

    def ratios(self) -> dict[str, float]:
        return {k: (self.value / c if c else math.nan) for k, c in self.ceilings.items()}


def _loop_us(r: dict[str, Any]) -> float:
    """CPU per call of the server's event loop (its main thread, which holds the GIL for Python)."""
    return float(r["server_threads_us"].get("main", math.nan))


class Report:
    """Collects figures and the raw result of every phase."""

    def __init__(self, smoke: bool) -> None:
        self.started = time.perf_counter()
        self.meta: dict[str, Any] = {"mode": "smoke" if smoke else "full", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.figures: list[Figure] = []
        self.phases: dict[str, Any] = {}
        self.notes: list[str] = []
        self._vw: dict[int, dict[str, Any]] = {}
        self._echo: dict[str, dict[str, Any]] = {}
        self._choose: dict[tuple[str, int], dict[str, Any]] = {}

    def note(self, text: str) -> None:
        self.notes.append(text)

    def skip(self, phase: str, why: str) -> None:
        self.phases[phase] = {"skipped": why}
        self.note(f"{phase} skipped: {why}")

    def add(
        self,
        key: str,
        label: str,
        value: float,
        unit: str,
        ceilings: dict[str, float] | None = None,
        target: str = "",
        met: bool | None = None,
    ) -> Figure:
        f = Figure(key, label, float(value), unit, ceilings or {}, target, met)
        self.figures.append(f)
        return f

    def _phase(self, name: str) -> dict[str, Any]:
        return self.phases.setdefault(name, {})  # type: ignore[no-any-return]

    # -- phases ------------------------------------------------------------------------------

    def vw(self, r: dict[str, Any]) -> None:
        a = int(r["arms"])
        self._vw[a] = r
        self._phase("vw")[str(a)] = r
        self.add(f"vw.{a}.predict", f"raw VW predict, {a} arms (CbModel)", r["predict_per_s"], "/s")
        self.add(f"vw.{a}.learn", f"raw VW learn, {a} arms (CbModel)", r["learn_per_s"], "/s")
        self.add(
            f"vw.{a}.binding_predict",
            f"raw VW predict, {a} arms (pylibvw direct)",
            r["binding_predict_per_s"],
            "/s",
            {"CbModel": r["predict_per_s"]},
        )
        self.add(
            f"vw.{a}.binding_learn",
            f"raw VW learn, {a} arms (pylibvw direct)",
            r["binding_learn_per_s"],
            "/s",
            {"CbModel": r["learn_per_s"]},
        )

    def server_time(self, r: dict[str, Any]) -> None:
        a = int(r["arms"])
        self._phase("server_time")[str(a)] = r
        ok = r["besides_vw_us"] <= 150.0
        self.add(f"server_time.{a}.choose", f"in-process Choose CPU (no gRPC), {a} arms, fastest round", r["choose_us"], "us")
        self.add(
            f"server_time.{a}.besides_vw",
            f"in-process Choose CPU besides VW, {a} arms, fastest round",
            r["besides_vw_us"],
            "us",
            {"VW predict": r["vw_predict_us"]},
            "<= 150 us" if a == 20 else "",
            ok if a == 20 else None,
        )

        if "median_besides_vw_us" in r:
            self.add(
                f"server_time.{a}.besides_vw_median",
                f"in-process Choose CPU besides VW, {a} arms, median round",
                r["median_besides_vw_us"],
                "us",
            )

    def rules(self, r: dict[str, Any]) -> None:
        a = int(r["arms"])
        self._phase("rules")[str(a)] = r
        self.add(f"rules.{a}.plain", f"in-process Choose CPU, {a} arms without rules, fastest round", r["plain_us"], "us")
        self.add(
            f"rules.{a}.ruled",
            f"in-process Choose CPU, {a} arms with a 3-condition rule each",
            r["ruled_us"],
            "us",
            target=">= 0.9 x speed without rules",
            met=r["speed_ratio"] >= 0.9,
        )
        self.add(f"rules.{a}.ratio", f"speed with rules / without, {a} arms, median of paired rounds", r["speed_ratio"], "x")

    def reward_inproc(self, r: dict[str, Any]) -> None:
        self.phases["reward_inproc"] = r
        self.add("reward.inproc", "Reward through the servicer, no gRPC (SQLite)", r["acks_per_s"], "acks/s")
        self.add("reward.inproc.cpu", "CPU per Reward through the servicer, no gRPC (SQLite)", r["cpu_us_per_ack"], "us")

    def echo(self, kind: str, r: dict[str, Any]) -> None:
        self._echo[kind] = r
        self._phase("echo")[kind] = r
        self.add(f"echo.{kind}", f"echo ceiling, {kind} sizes, saturation", r["rate"], "req/s")
        self.add(f"echo.{kind}.server_cpu", f"echo server CPU per {kind}", r["server_cpu_us"], "us")
        if kind == "choose":
            self.add("echo.choose.loop_cpu", "its event loop's CPU per call (echo)", _loop_us(r), "us")

    def partial(self, kind: str, r: dict[str, Any]) -> None:
        """A server doing part of a 20-arm Choose's work, against the echo of the same run."""
        self._phase("partial")[kind] = r
        what = {"parse": "parse the request, build the response", "decode": "that + decode 30 features into VW's context line"}[kind]
        ceil = {"echo": self._echo["choose"]["rate"]} if "choose" in self._echo else {}
        self.add(f"partial.{kind}", f"part of a Choose: {what}", r["rate"], "req/s", ceil)
        self.add(f"partial.{kind}.loop_cpu", f"its event loop's CPU per call ({kind})", _loop_us(r), "us")

    def choose(self, a: int, r: dict[str, Any], backend: str = "sqlite") -> None:
        self._choose[(backend, a)] = r
        self._phase("choose")[f"{backend}.{a}"] = r
        ceil = {"echo": self._echo["choose"]["rate"]} if "choose" in self._echo else {}
        if a in self._vw:
            ceil["raw VW predict"] = self._vw[a]["predict_per_s"]
        met = None
        if a == 20 and "echo" in ceil:
            met = r["rate"] >= 0.6 * ceil["echo"]
        sfx = "" if backend == "sqlite" else f" ({backend})"
        self.add(
            f"choose.{backend}.{a}", f"Choose {a} arms, saturation{sfx}", r["rate"], "req/s", ceil, ">= 0.6 x echo" if a == 20 else "", met
        )
        cpu_ceil = {"echo": self._echo["choose"]["server_cpu_us"]} if "choose" in self._echo else {}
        self.add(f"choose.{backend}.{a}.server_cpu", f"server CPU per Choose, {a} arms{sfx}", r["server_cpu_us"], "us", cpu_ceil)
        if "choose" in self._echo:
            self.add(
                f"choose.{backend}.{a}.loop_cpu",
                f"its event loop's CPU per call ({a} arms{sfx})",
                _loop_us(r),
                "us",
                {"echo": _loop_us(self._echo["choose"])},
            )
        if a in self._vw:
            besides = r["server_cpu_us"] - self._vw[a]["predict_us"]
            # gRPC's own share is in it (see the echo's): the 150 µs target is the in-process figure's
            self.add(
                f"choose.{backend}.{a}.server_cpu_besides_vw",
                f"server CPU per Choose besides VW, {a} arms, gRPC included{sfx}",
                besides,
                "us",
                cpu_ceil,
            )

    def latency(self, a: int, load: float, rate: float, runs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """One paced run, or several (the target's point): the figures are the run whose p99 is
        the median, and the JSON keeps every run."""
        ranked = sorted(runs, key=lambda run: (math.isnan(run[0]["p99_ms"]), run[0]["p99_ms"]))  # a run with no answer: last
        r, echo = ranked[len(ranked) // 2]  # of an even number, the higher of the middle two
        pct = f"{load:.0%}"
        self._phase("latency")[f"{a}@{pct}"] = {
            "rate": rate,
            "choose": r,
            "echo": echo,
            "runs": [{"choose": c, "echo": e} for c, e in runs],
        }
        for q in ("p50", "p95", "p99"):
            target = met = None
            if (a, load) == TARGET_POINT and q == "p99":
                target, met = "<= 10 ms", r["p99_ms"] <= 10.0
            label = f"Choose {a} arms {q} at {pct} ({rate:,.0f}/s)" + (
                f", the run with the median p99 of {len(runs)}" if len(runs) > 1 else ""
            )
            self.add(f"latency.{a}.{pct}.{q}", label, r[f"{q}_ms"], "ms", {"echo": echo[f"{q}_ms"]}, target or "", met)
        if len(runs) > 1:
            self.note(
                f"Choose {a} arms p99 at {pct}, every run: "
                + " / ".join(f"{c['p99_ms']:.1f}" for c, _ in runs)
                + " ms (echo: "
                + " / ".join(f"{e['p99_ms']:.1f}" for _, e in runs)
                + " ms)"
            )
        for c, _ in runs:
            if c["rate"] < 0.95 * rate or c["dropped"] or c["errors"]:
                self.note(
                    f"Choose {a} arms at {pct}: asked for {rate:,.0f}/s, served {c['rate']:,.0f}/s "
                    f"({c['errors']} errors, {c['dropped']} not sent)"
                )

    def context(self, r: dict[str, Any]) -> None:
        """Choose with the stored profile and history against the same placement without
        (nextbest.bench.context): medians of the rounds, as ratios profiled / plain."""
        from nextbest.bench.context import LOAD, TARGETS

        self.phases["context"] = r
        full = self.meta.get("mode") == "full"
        for backend, b in r.items():
            for kind in ("many", "repeat"):
                if kind not in b:
                    continue
                s = b[kind]
                who = f"{s['customers']:,} customers" + (" repeating" if kind == "repeat" else "")
                what = f"({backend}, {who}, cache hits {s['hit_rate']:.0%}, {s['rounds']} rounds)"
                pro, plain = s["profiled"], s["plain"]
                inline = s.get("inline")
                key = f"context.{backend}.{kind}"

                def base(k: str, plain: dict[str, Any] = plain, inline: dict[str, Any] | None = inline) -> dict[str, float]:
                    return {"without": plain[k], **({"profile in the request": inline[k]} if inline else {})}

                if inline:
                    self.add(
                        f"{key}.inline_rate",
                        f"Choose {b['arms']} arms, the profile's features in the request, saturation ({backend})",
                        inline["rate"],
                        "req/s",
                        {"without": plain["rate"]},
                    )
                self.add(
                    f"{key}.rate",
                    f"Choose {b['arms']} arms, profile + history, saturation {what}",
                    pro["rate"],
                    "req/s",
                    base("rate"),
                    f">= {TARGETS['rate']} x without",
                    s["rate_ratio"] >= TARGETS["rate"] if full else None,
                )
                self.add(
                    f"{key}.p99",
                    f"Choose {b['arms']} arms, profile + history, p99 at {LOAD:.0%} of without ({s['paced_rate']:,.0f}/s) {what}",
                    pro["p99_ms"],
                    "ms",
                    base("p99_ms"),
                    f"<= {TARGETS['p99']} x without",
                    s["p99_ratio"] <= TARGETS["p99"] if full else None,
                )
                self.add(
                    f"{key}.p99_own",
                    f"Choose {b['arms']} arms, profile + history, p99 at {LOAD:.0%} of its own ({pro['own_rate']:,.0f}/s) {what}",
                    pro["own_p99_ms"],
                    "ms",
                )
                self.add(
                    f"{key}.server_cpu",
                    f"server CPU per Choose, profile + history {what}",
                    pro["server_cpu_us"],
                    "us",
                    base("server_cpu_us"),
                )
                self.note(
                    f"context {backend} {kind}: profiled / plain by round, throughput "
                    + " / ".join(f"{x:.2f}" for x in s["paired_rate_ratios"])
                    + ", p99 "
                    + " / ".join(f"{x:.2f}" for x in s["paired_p99_ratios"])
                )
                if pro["errors"] or plain["errors"]:
                    self.note(f"context {backend} {kind}: {pro['errors']} calls failed or not sent (profiled), {plain['errors']} (plain)")

    def reward(self, backend: str, r: dict[str, Any]) -> None:
        batch = int(r.get("batch", 1))
        key = f"reward.{backend}" if batch == 1 else f"reward_batch.{backend}"
        what = f"Reward durable acks ({backend})" if batch == 1 else f"RewardBatch of {batch}, durable acks ({backend})"
        self._phase("reward")[backend if batch == 1 else f"{backend}.batch{batch}"] = r
        goal = 5000.0 if backend == "sqlite" else 3000.0
        ceil = {"echo": self._echo["reward"]["rate"]} if "reward" in self._echo else {}
        self.add(key, what, r["rate"], "acks/s", ceil, f">= {goal:,.0f}/s", r["rate"] >= goal)
        self.add(
            f"{key}.server_cpu",
            f"server CPU per reward ({what.split(',')[0].split(' durable')[0]}, {backend})",
            r["server_cpu_us"],
            "us",
            {"echo": self._echo["reward"]["server_cpu_us"]} if "reward" in self._echo else {},
        )
        if r.get("ran_out_of_ids"):
            self.note(f"{what} used all {r['ids_available']} prepared events before its time was up")
        if r["errors"] or r["not_acked"]:
            self.note(f"{what}: {r['errors']} errors {r['error_codes']}, {r['not_acked']} not LEARNED")

    def overload(self, sat: dict[str, Any], unloaded: dict[str, Any], flood: dict[str, Any], unshed: dict[str, Any]) -> None:
        """Choose at 4 x saturation: accepted latency against the p99 at 50 % load, share shed,
        refusal latency, accepted throughput against saturation; and each against the same flood
        on a server with shedding off (shed_queue_ms 0), all in one run."""
        self.phases["overload"] = {"saturation": sat, "unloaded": unloaded, "flood": flood, "unshed": unshed}
        answered = flood["ok"] + flood["errors"]
        shed = flood["error_codes"].get("RESOURCE_EXHAUSTED", 0)
        base = {"p99 at 50 % load": unloaded["p99_ms"]}
        self.add(
            "overload.offered",
            "Choose 20 arms offered at 4 x saturation (open loop)",
            4.0 * sat["rate"],
            "req/s",
            {"saturation": sat["rate"]},
        )
        self.add(
            "overload.accepted.p50",
            "accepted Choose p50 at 4 x saturation",
            flood["p50_ms"],
            "ms",
            {**base, "no shedding p50": unshed["p50_ms"]},
        )
        self.add(
            "overload.accepted.p99",
            "accepted Choose p99 at 4 x saturation",
            flood["p99_ms"],
            "ms",
            {**base, "no shedding p99": unshed["p99_ms"]},
        )
        self.add(
            "overload.shed_share",
            "share of Choose shed (RESOURCE_EXHAUSTED) at 4 x saturation",
            shed / answered if answered else math.nan,
            "",
        )
        self.add("overload.shed.p50", "RESOURCE_EXHAUSTED answer p50 at 4 x saturation", flood["shed_p50_ms"], "ms", base)
        self.add(
            "overload.accepted.rate",
            "accepted Choose throughput at 4 x saturation",
            flood["rate"],
            "req/s",
            {"saturation": sat["rate"], "no shedding": unshed["rate"]},
        )
        other = {c: k for c, k in flood["error_codes"].items() if c != "RESOURCE_EXHAUSTED"}
        if other or flood["dropped"]:
            self.note(f"overload: other answers {other}, {flood['dropped']} calls not sent (load generator at its limit)")
        if unshed["errors"] or unshed["dropped"]:
            self.note(
                f"overload, shedding off: refused {unshed['error_codes']} (CANCELLED: gRPC core's own queue bound),"
                f" {unshed['dropped']} calls not sent"
            )

    def overload_backoff(self, shed: dict[str, Any], unshed: dict[str, Any]) -> None:
        """600 callers who back off on RESOURCE_EXHAUSTED, shedding on against off (same run)."""
        self.phases["overload"].update(backoff=shed, backoff_unshed=unshed)
        answered = shed["ok"] + shed["errors"]
        self.add(
            "overload.backoff.p50",
            "accepted Choose p50, 600 callers backing off",
            shed["p50_ms"],
            "ms",
            {"no shedding p50": unshed["p50_ms"]},
        )
        self.add(
            "overload.backoff.p99",
            "accepted Choose p99, 600 callers backing off",
            shed["p99_ms"],
            "ms",
            {"no shedding p99": unshed["p99_ms"]},
        )
        self.add(
            "overload.backoff.shed_share",
            "share shed, 600 callers backing off",
            shed["error_codes"].get("RESOURCE_EXHAUSTED", 0) / answered if answered else math.nan,
            "",
        )
        self.add(
            "overload.backoff.rate",
            "accepted Choose throughput, 600 callers backing off",
            shed["rate"],
            "req/s",
            {"no shedding": unshed["rate"]},
        )

    def replicas(self, one: dict[str, Any], two: dict[str, Any]) -> None:
        self.phases["replicas"] = {"one": one, "two": two}
        self.add("replicas.one", "Choose 20 arms, one server (PostgreSQL, 2 load processes)", one["rate"], "req/s")
        self.add(
            "replicas.two", "Choose 20 arms, two servers (PostgreSQL, 2 load processes)", two["rate"], "req/s", {"one server": one["rate"]}
        )
        for name, r in (("one server", one), ("two servers", two)):
            if r["errors"]:
                self.note(f"replicas, {name}: {r['errors']} errors {r['error_codes']}")

    def memory(self, variant: str, r: dict[str, Any]) -> None:
        self._phase("memory")[variant] = r
        n = r["placements"]
        what = f"bits {r['bits']}{', ' + r['vw_args'] if r['vw_args'] else ''}"
        self.add(f"memory.{variant}.rss_1", f"RSS, 1 placement x 20 arms ({what})", r["rss_1"] / MIB, "MiB")
        self.add(f"memory.{variant}.per_placement", f"RSS per placement x 20 arms ({what})", r["per_placement"] / MIB, "MiB")
        t = r["target_placements"]
        label = f"RSS, {t:,} placements x 20 arms ({what})" + (f", extrapolated from {n:,}" if r["extrapolated"] else "")
        self.add(
            f"memory.{variant}.rss_target",
            label,
            r["rss_at_target"] / MIB,
            "MiB",
            {"2 GiB target": 2048.0},
            "<= 2048 MiB",
            r["rss_at_target"] <= 2 * GIB,
        )

    def replay(self, r: dict[str, Any]) -> None:
        """Offline replay at scale (nextbest.bench.replay): speeds as ratios to the floors of the
        same run, and peak memory at two sizes of the log."""
        self.phases["replay"] = r
        t = r["targets"]
        full = self.meta.get("mode") == "full"
        db, dsj, vw = r["db"], r["dsjson"], r["vw"]
        self.add(
            "replay.db",
            f"replay from SQLite, {db['events']:,} events, IPS+SNIPS of 3 policies",
            db["events_per_s"],
            "events/s",
            {"bare SELECT": db["select_rows_per_s"]},
            f">= {t['db_events_per_s']:,.0f}/s",
            db["events_per_s"] >= t["db_events_per_s"] if full else None,
        )
        self.add(
            "replay.dsjson",
            f"replay from DSJSON, {dsj['events']:,} events ({dsj['bytes'] / 1e6:,.0f} MB)",
            dsj["events_per_s"],
            "events/s",
            {"orjson parse": dsj["orjson_lines_per_s"]},
            f">= {t['dsjson_vs_orjson']} x orjson",
            dsj["ratio"] >= t["dsjson_vs_orjson"] if full else None,
        )
        for n, m in r["rss"].items():
            if m["returncode"] != 0:
                self.note(f"replay of {int(n):,} events exited {m['returncode']}: {m['stderr'][-200:]}")
            self.add(
                f"replay.rss.{n}",
                f"replay peak RSS, {int(n):,} events logged ({m['events']:,} replayed in {m['seconds']:.0f} s with process start)",
                m["rss_bytes"] / MIB,
                "MiB",
                {},
                f"<= {t['rss_mib']:,.0f} MiB",
                m["rss_bytes"] / MIB <= t["rss_mib"] if full else None,
            )
        arms = vw["shape"]["arms"]
        for source, floor in (("db", "VW alone, same text"), ("dsjson", "VW alone, same lines (--dsjson)")):
            v = vw[source]
            self.add(
                f"replay.vw.{source}",
                f"vw: candidate from {source}, {v['events']:,} events x {arms} arms",
                v["events_per_s"],
                "events/s",
                {floor: v["learn_per_s"]},
                f">= {t['vw_vs_learn']} x VW",
                v["ratio"] >= t["vw_vs_learn"] if full else None,
            )

    def profile_load(self, r: dict[str, Any]) -> None:
        """``nextbest profiles load`` of generated Parquet extracts (nextbest.bench.profiles): its
        rate against pyarrow's read and a plain COPY of the same rows, and its peak memory by size."""
        self.phases["profiles"] = r
        t = r["targets"]
        full = self.meta.get("mode") == "full"
        pg = r["backend"] == "postgres"
        sizes = sorted(r["sizes"].items(), key=lambda kv: int(kv[0]))
        for n, m in sizes:
            ld = m["load"]
            if ld["returncode"] != 0:
                self.note(f"profiles load of {int(n):,} rows exited {ld['returncode']}: {ld['stderr'][-200:]}")
            ceilings = {"pyarrow read": m["read"]["rows_per_s"]}
            if "copy" in m:
                ceilings["plain COPY"] = m["copy"]["rows_per_s"]
            self.add(
                f"profiles.load.{n}",
                f"profiles load, Parquet of {int(n):,} rows x {r['feature_columns']} features into {r['backend']}",
                ld["rows_per_s"],
                "rows/s",
                ceilings,
                f">= {t['rows_per_s']:,.0f}/s" if pg else "",
                ld["rows_per_s"] >= t["rows_per_s"] if full and pg else None,
            )
        smallest = sizes[0][1]["load"]["rss_bytes"] if sizes else 0
        for n, m in sizes:
            rss = m["load"]["rss_bytes"]
            self.add(
                f"profiles.rss.{n}",
                f"profiles load peak RSS, {int(n):,} rows ({m['file_bytes'] / MIB:,.0f} MiB file)",
                rss / MIB,
                "MiB",
                {f"at {int(sizes[0][0]):,} rows": smallest / MIB} if n != sizes[0][0] else {},
                f"<= {t['rss_growth']} x at {int(sizes[0][0]):,} rows" if n != sizes[0][0] else "",
                rss <= t["rss_growth"] * smallest if n != sizes[0][0] and full else None,
            )

    def capacity(self, r: dict[str, Any]) -> None:
        """The database's share of a decision and a reward, and the learner's rate (nextbest.bench.capacity)."""
        self.phases["capacity"] = r
        if "postgres_skipped" in r:
            self.note(f"capacity on PostgreSQL skipped: {r['postgres_skipped']}")
        for db in ("sqlite", "postgres"):
            if db not in r:
                continue
            f = r[db]
            for what, label in (("per_decision", "a decision (Choose, 20 arms x 30 features)"), ("per_reward", "a reward")):
                rows = sum(v["rows"] for v in f[what].values())
                self.add(
                    f"capacity.{db}.{what}",
                    f"{db}: bytes stored per {label}, {rows:.2f} new rows",
                    sum(v["bytes"] for v in f[what].values()),
                    "B",
                )
            self.add(
                f"capacity.{db}.learner",
                f"{db}: learner, one placement x 20 arms (VW text from the Choose)",
                f["learn_warm_per_s"],
                "events/s",
                {"the same from the log": f["learn_cold_per_s"]},
            )
        for key in ("sqlite_ingest", "postgres_ingest"):
            for k, v in r.get(key, {}).items():
                if k != "batch":
                    db = key.split("_")[0]
                    self.add(
                        f"capacity.{key}.{k}",
                        f"{db}: decision rows written by {k} writer(s) at once (store group commits of {r[key]['batch']})",
                        v["rows_per_s"],
                        "rows/s",
                    )

    # -- output ---------------------------------------------------------------------------------

    def table(self) -> str:
        rows = [("figure", "value", "unit", "ratio to ceiling", "target", "met")]
        for f in self.figures:
            ratio = "; ".join(f"{_ratio(v)} x {k}" for k, v in f.ratios().items())
            met = "" if f.met is None else ("yes" if f.met else "NO")
            rows.append((f.label, _num(f.value), f.unit, ratio, f.target, met))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.rjust(w) if i == 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        m = self.meta
        head = (
            f"nextbest bench ({m['mode']}), {m.get('cores')} cores, {m.get('cpu', '')}; "
            f"machine {m.get('background_busy', 0):.0%} busy before the run; {m.get('seconds', 0):.0f} s"
        )
        return "\n".join([head, "", *lines, *(["", "notes:", *(f"  - {n}" for n in self.notes)] if self.notes else [])])

    def profiles(self) -> str:
        parts = []
        for a, r in self.phases.get("server_time", {}).items():
            for k in ("profile", "profile_writer"):
                if k in r:
                    parts.append(f"== Choose {a} arms, in process: {k} (tottime) ==\n{r[k]}")
        r = self.phases.get("reward_inproc", {})
        for k in ("profile_loop", "profile_writer"):
            if k in r:
                parts.append(f"== Reward, in process: {k} (tottime) ==\n{r[k]}")
        return "\n\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        figs = []
        for f in self.figures:
            d = asdict(f)
            d["ratios"] = f.ratios()
            figs.append(d)
        out: dict[str, Any] = _finite({"meta": self.meta, "figures": figs, "phases": self.phases, "notes": self.notes})
        return out


def _num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}"


def _ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"


def _finite(o: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o
