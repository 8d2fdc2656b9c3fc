"""``nextbest profiles load`` and ``nextbest profiles get``: customer profiles from the warehouse.

``load`` streams a Parquet or CSV extract (nextbest.offline.profile_file) into the profile store,
either straight into the database (``--db``: one ``put_profiles`` transaction per batch, COPY on
PostgreSQL) or through a server (``--target``: one PutProfiles call per batch). Each batch is
all or nothing; on an error the command stops, says which file, row and column, and how far the
load got. Exit codes: 0 done, 1 the database or server failed, 2 a bad file or bad arguments.
Heavy imports (pyarrow, SQLAlchemy, gRPC stubs) happen when a command runs.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from nextbest.bandit.errors import InvalidInput, NextbestError
from nextbest.cli.args import positive_int
from nextbest.cli.target import ENV, env_target

if TYPE_CHECKING:
    from nextbest.offline.profile_file import ProfileBatch
    from nextbest.storage.base import Profile, ProfilesPut

B = TypeVar("B")
DEFAULT_DB_BATCH = 10_000  # rows per transaction on the direct path
DEFAULT_TARGET_BATCH = 1_000  # rows per PutProfiles call: the server's default max_profile_batch


@dataclass
class Loaded:
    """How far a load got: rows in batches stored (all of each), and the counts the store gave."""

    rows: int = 0
    batches: int = 0
    stored: int = 0
    stale: int = 0


class Progress:
    """One line on standard error, rewritten in place, while a terminal watches."""

    def __init__(self, path: str, total: int | None, stream: TextIO = sys.stderr, every: float = 0.2) -> None:
        self.path, self.total, self.stream, self.every = path, total, stream, every
        self.started = time.monotonic()
        self.shown = 0.0

    def __call__(self, rows: int) -> None:
        now = time.monotonic()
        if now - self.shown < self.every:
            return
        self.shown = now
        rate = rows / max(now - self.started, 1e-9)
        bar = ""
        if self.total:
            done = min(rows / self.total, 1.0)
            bar = f"[{'#' * int(done * 30):.<30}] {done:4.0%} "
        self.stream.write(f"\rloading {bar}{rows:,} rows, {rate:,.0f}/s ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def prefetched(batches: Iterator[B], depth: int = 1) -> Generator[B, None, None]:
    """``batches`` read one ahead in a thread: the next batch is read and checked while the
    database writes this one (PostgreSQL works in its own process). Memory holds ``depth + 2``
    batches at most; an error of the reader is raised here, after the batches before it."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(("batch", b), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            q.put(("error", e))

    t = threading.Thread(target=run, name="profile-reader", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "batch":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()
        while t.is_alive():  # let the reader see the stop, then let it finish
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def _ttl(text: str | None) -> float | None:
    if text is None:
        return None
    from nextbest.bandit.spec import parse_duration

    try:
        return parse_duration(text.strip())
    except ValueError as e:
        raise InvalidInput("--ttl", f"{text!r}: {e}") from None


def _limits() -> Any:
    """The limits of the server's settings (NEXTBEST_* variables), as a ChooseRequest is checked."""
    from nextbest.offline.profile_file import Limits
    from nextbest.settings import Settings

    return Limits.from_settings(Settings())


def _row_of(details: str, batch: ProfileBatch) -> str:
    """``profiles[12].features[3]`` in a server's refusal, as the file's row."""
    import re

    m = re.search(r"profiles\[(\d+)\]", details)
    if m and int(m.group(1)) < len(batch.profiles):
        return f"row {batch.first_row + int(m.group(1)):,}"
    return f"rows {batch.first_row:,}-{batch.last_row:,}"


def load(
    path: str,
    put: Callable[[Any], ProfilesPut],
    *,
    format: str | None,
    batch_rows: int,
    ttl: float | None,
    limits: Any,
    progress: Callable[[int], None] | None = None,
    refused: Callable[[BaseException, ProfileBatch], NextbestError | None] | None = None,
    tables: bool = False,
) -> Loaded:
    """Read ``path`` and ``put`` each batch (its profiles; ``tables``: the Arrow table of
    offline.profile_table, for Store.put_profile_table); a :class:`LoadStopped` on the first error."""
    from nextbest.offline.profile_file import read_profiles
    from nextbest.offline.profile_table import read_profile_tables

    done = Loaded()
    read: Callable[..., Iterator[Any]] = read_profile_tables if tables else read_profiles
    batches = prefetched(read(path, format=format, batch_rows=batch_rows, limits=limits, ttl=ttl))
    try:
        for batch in batches:
            try:
                r = put(batch.table if tables else batch.profiles)
            except Exception as e:
                mapped = refused(e, batch) if refused is not None else None
                raise LoadStopped(mapped or e, done) from e
            done.rows, done.batches = batch.last_row, done.batches + 1
            done.stored += r.stored
            done.stale += r.stale
            if progress is not None:
                progress(done.rows)
    except NextbestError as e:
        raise LoadStopped(e, done) from e
    finally:
        batches.close()
    return done


class LoadStopped(Exception):
    """A load stopped by ``error`` after ``loaded``."""

    def __init__(self, error: BaseException, loaded: Loaded) -> None:
        super().__init__(str(error))
        self.error, self.loaded = error, loaded

    def how_far(self) -> str:
        n, k = self.loaded.rows, self.loaded.batches
        if n == 0:
            return "loaded no rows before the error; nothing was stored"
        return f"loaded rows 1-{n:,} ({k:,} batch{'' if k == 1 else 'es'}) before the error; rows from {n + 1:,} on were not loaded"

    def report(self, progress: Progress | None) -> int:
        """Close the progress line, say on stderr what stopped the load and how far it got, and
        return the exit code: 2 for a refused input, 1 otherwise. An error that is neither
        nextbest's nor gRPC's is a bug: raised again."""
        if progress is not None:
            progress.close()
        e = self.error
        if isinstance(e, NextbestError):
            print(f"error: {e}", file=sys.stderr)
        elif hasattr(e, "code") and hasattr(e, "details"):  # grpc.RpcError
            code = e.code()
            print(f"error: {getattr(code, 'name', code)}: {e.details()}", file=sys.stderr)
        else:
            raise e from None
        print(self.how_far(), file=sys.stderr)
        return 2 if isinstance(e, InvalidInput) else 1


def _load(args: argparse.Namespace) -> int:
    from nextbest.telemetry.gc_pauses import gc_paused

    # Loading makes millions of small containers and no cycles: the collector would only scan
    # them again and again (half the loader's time, measured); reference counting frees them.
    with gc_paused():
        return _load_file(args)


def _load_file(args: argparse.Namespace) -> int:
    from nextbest.offline.profile_file import count_rows, detect_format

    fmt = detect_format(args.file, args.format)
    ttl = _ttl(args.ttl)
    batch_rows = args.batch or (DEFAULT_DB_BATCH if args.db else DEFAULT_TARGET_BATCH)
    limits = _limits()
    progress = Progress(args.file, count_rows(args.file, fmt)) if sys.stderr.isatty() else None
    close: Callable[[], None]
    put: Callable[[Any], ProfilesPut]
    refused: Callable[[BaseException, ProfileBatch], NextbestError | None] | None = None
    if args.db:
        from nextbest.storage.sql import open_store

        store = open_store(args.db)
        import pyarrow as pa

        # malloc's pool, not jemalloc's: jemalloc kept 60-75 MiB more resident for the same
        # batches (peak RSS at 1 M rows: 319 against 256 MiB; as flat as the file grows either way)
        pa.set_memory_pool(pa.system_memory_pool())

        def put_table(table: Any) -> ProfilesPut:  # no Python object per row: 3x less of the loader's CPU
            return store.put_profile_table(table, time.time())

        put = put_table

        close = store.close
    else:
        import grpc

        from nextbest.client import NextbestClient

        client = NextbestClient(args.target, timeout=args.timeout, token=args.token)
        put = client.put_profiles
        close = client.close

        def refused(e: BaseException, batch: ProfileBatch) -> NextbestError | None:
            if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return InvalidInput(f"{args.file}, {_row_of(e.details() or '', batch)}", f"the server refused it: {e.details()}")
            return None

    started = time.perf_counter()  # the store is open (its schema migrated): the load itself from here
    try:
        done = load(
            args.file,
            put,
            format=fmt,
            batch_rows=batch_rows,
            ttl=ttl,
            limits=limits,
            progress=progress,
            refused=refused,
            tables=bool(args.db),
        )
    except LoadStopped as stop:
        return stop.report(progress)
    finally:
        close()
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - started
    print(
        f"{done.rows:,} rows read from {args.file} in {done.batches:,} batch{'' if done.batches == 1 else 'es'}: "
        f"{done.stored:,} stored, {done.stale:,} stale (older than the stored profile); "
        f"{seconds:.1f} s, {done.rows / max(seconds, 1e-9):,.0f} rows/s"
    )
    return 0


def profile_json(p: Profile) -> dict[str, Any]:
    """A profile as JSON: features by ``namespace.name``, times as ISO 8601 (UTC) and epoch seconds."""
    from datetime import UTC, datetime

    def iso(t: float | None) -> str | None:
        return None if t is None else datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    return {
        "customer_id": p.customer_id,
        "as_of": iso(p.as_of),
        "expires_at": iso(p.expires_at),
        "features": {f"{ns}.{name}" if ns else name: v for ns, name, v in p.features},
    }


def _get(args: argparse.Namespace) -> int:
    from nextbest.bandit.errors import NotFound

    if args.db:
        from nextbest.storage.sql import open_store

        store = open_store(args.db)
        try:
            found = store.get_profiles([args.customer_id], time.time()).get(args.customer_id)
        finally:
            store.close()
    else:
        from nextbest.client import NextbestClient

        with NextbestClient(args.target, timeout=args.timeout, token=args.token) as nb:
            found = nb.get_profile(args.customer_id)
    if found is None:
        raise NotFound(f"no profile of customer {args.customer_id!r} (or it expired)")
    print(json.dumps(profile_json(found), ensure_ascii=False))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``profiles load`` and ``profiles get`` to the nextbest command."""
    p = sub.add_parser("profiles", help="customer profiles: load a warehouse extract, show one")
    verbs = p.add_subparsers(dest="profiles_command", required=True)

    def where(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group(required=env_target() is None)  # $NEXTBEST_TARGET counts as --target
        g.add_argument("--db", help="database URL (or SQLite path): write to it directly")
        g.add_argument("--target", default=env_target(), help=f"server address HOST:PORT: go through its ProfileService (default ${ENV})")
        sp.add_argument(
            "--token",
            help="bearer token with the data or admin role (--target); default $NEXTBEST_TOKEN, "
            "which is better: a command line is visible to every user of the machine",
        )
        sp.add_argument("--timeout", type=float, default=60.0, help="seconds per call (--target; default 60)")

    ld = verbs.add_parser(
        "load",
        help="load a Parquet or CSV extract: customer_id, optional as_of and expires_at, one namespace.name column per feature",
    )
    ld.add_argument("file")
    ld.add_argument("--format", choices=["parquet", "csv"], help="default: from the file name (.parquet, .csv)")
    where(ld)
    ld.add_argument(
        "--batch",
        type=positive_int,
        metavar="N",
        help=f"rows per transaction, each all or nothing (default {DEFAULT_DB_BATCH} with --db, "
        f"{DEFAULT_TARGET_BATCH} with --target: at most the server's max_profile_batch)",
    )
    ld.add_argument("--ttl", help="a profile without expires_at expires this long after its as_of (600, 10m, 7d); default: never")
    ld.set_defaults(func=_load)

    g = verbs.add_parser("get", help="print a customer's stored profile as JSON")
    g.add_argument("customer_id")
    where(g)
    g.set_defaults(func=_get)
