"""SQL schema shared by SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    text,
)

metadata = MetaData()

placements = Table(
    "placements",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("spec", JSON, nullable=False),  # PlacementSpec without arms
    Column("generation", Integer, nullable=False),
    Column("model_since_seq", BigInteger, nullable=False),
    Column("updated_at", Double, nullable=False),
)

arms = Table(
    "arms",
    metadata,
    Column("placement_id", String(128), primary_key=True),
    Column("arm_id", String(128), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("active", Boolean, nullable=False),
)

arm_versions = Table(
    "arm_versions",
    metadata,
    Column("placement_id", String(128), primary_key=True),
    Column("arm_id", String(128), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("features", JSON, nullable=False),
)

decisions = Table(
    "decisions",
    metadata,
    Column("event_id", String(256), primary_key=True),
    Column("slot", Integer, primary_key=True, autoincrement=False, server_default="0"),
    Column("placement_id", String(128), nullable=False),
    Column("customer_id", String(256), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("deadline", Double, nullable=False),
    Column("features", JSON, nullable=False),  # [[namespace, name, value], ...]
    Column("arms", JSON, nullable=False),  # [[arm_id, version], ...] in scoring order
    Column("pmf", JSON, nullable=False),
    Column("chosen", Integer),
    Column("arm_id", String(128)),
    Column("probability", Double, nullable=False),
    Column("model_version", BigInteger, nullable=False),
    Column("outcome", SmallInteger, nullable=False),
    Column("reward", Double),
    Column("rewarded_at", Double),
    Column("learn_seq", BigInteger, unique=True),
    Column("cost", Double, nullable=False, server_default="0"),
    Column("reward_cost", Double, nullable=False, server_default="0"),
    Column("budgets", JSON),  # [[key, period], ...]
    Column("ineligible", JSON),  # [[arm_id, reason], ...]
    Column("variant", String(64), nullable=False, server_default=""),
    Column("activated", Boolean, nullable=False, server_default="1"),
    # The server holding the decision's open window in memory (servers.id); NULL: none known.
    Column("owner", String(32)),
    # How the pmf came about (bandit.decision_log.Explanation.to_json); NULL before 0005.
    Column("explain", JSON),
    # Where its features came from besides the request (bandit.decision_log.DecisionContext:
    # the profile's as_of and keys, each arm's history features); NULL: the request's only.
    Column("context", JSON),
    Index("ix_decisions_learn", "placement_id", "variant", "learn_seq"),
    Index("ix_decisions_unclaimed", "placement_id", "outcome", "learn_seq"),
    Index("ix_decisions_placement_arm", "placement_id", "arm_id"),
    Index("ix_decisions_open", "outcome", "deadline"),
    # Replay and export read a placement in time order (--since/--until a range of it): this
    # index gives the order without sorting the log (half the time of a 200,000-row replay).
    Index("ix_decisions_time", "placement_id", "created_at", "event_id", "slot"),
    # A customer's decisions in time order: attribution of a batch of conversions (Store.touches_of) and
    # erasing a customer (every decision, served or not) read them without scanning the log.
    Index("ix_decisions_customer", "customer_id", "created_at"),
)

# The servers writing this database, each with its last sign of life: a starting server takes
# over the open windows of servers that stopped, never those of a live one.
servers = Table(
    "servers",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("heartbeat", Double, nullable=False),
    # The configuration serial (counters "config") this server has loaded: ApplyConfig waits,
    # bounded, until every live server has confirmed the serial it wrote.
    Column("config_seen", BigInteger, nullable=False, server_default="0"),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("spec", JSON, nullable=False),
    Column("updated_at", Double, nullable=False, server_default="0"),
)

# The budget ledger: ``leased`` only grows (up to the limit) by atomic conditional updates,
# so processes that spend only what they leased can never overspend together.
budget_accounts = Table(
    "budget_accounts",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("period", String(16), primary_key=True),
    Column("leased", Double, nullable=False),
    Column("spent", Double, nullable=False),
    Column("reserved", Double, nullable=False),
    # The limit leases are checked against, on the row they change (so that a lease and a
    # configuration change lowering it are serialized); NULL: none stored yet (the caller's).
    Column("cap", Double),
)

# The limits of every budget as last applied: "total" or "daily" per key; a new account row
# takes its cap from here. Written in the transaction that stores the configuration.
budget_limits = Table(
    "budget_limits",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("kind", String(8), primary_key=True),  # "total" | "daily"
    Column("cap", Double),  # NULL: the budget has no such limit any more
)

# Who holds the leases of budget_accounts.leased: per account and server, what that server was
# granted and has not given back. A server gives back only its own; the held part of an open
# window moves with the window when another server takes it over.
budget_leases = Table(
    "budget_leases",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("period", String(16), primary_key=True),
    Column("server_id", String(32), primary_key=True),
    Column("leased", Double, nullable=False),
    # What this server's decisions spent and reserved from it (moved with taken-over windows):
    # the unused part of a server that stopped without giving it back is leased - used.
    Column("used", Double, nullable=False, server_default="0"),
)

# Rewards that are not (or not yet) the learned one: "late" (after the window closed) and
# "agg" (one of several rewards of an event whose placement aggregates them at window close).
reward_events = Table(
    "reward_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(256), nullable=False),
    Column("slot", Integer, nullable=False, server_default="0"),
    Column("reward", Double, nullable=False),
    Column("received_at", Double, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("reward_id", String(128)),  # the caller's idempotency key, if it sent one
    Index("ix_reward_events_event", "event_id", "slot"),
    Index("ux_reward_events_key", "event_id", "slot", "reward_id", unique=True),
)

# Impressions per customer, for contact policies and fatigue that hold across servers sharing
# the database (contact_store "database"): written in the Choose's own transaction, under a
# per-customer lock; whether a customer responded comes from the decision's row.
contact_impressions = Table(
    "contact_impressions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("customer_id", String(256), nullable=False),
    Column("at", Double, nullable=False),
    Column("placement_id", String(128), nullable=False),
    Column("arm_id", String(128), nullable=False),
    Column("event_id", String(256), nullable=False),
    Column("slot", Integer, nullable=False, server_default="0"),
    Index("ix_contact_impressions_customer", "customer_id", "at"),
    # One row per impression: its Choose and a backfill from the log may both write it.
    Index("ux_contact_impressions_event", "event_id", "slot", unique=True),
    Index("ix_contact_impressions_at", "at"),
)

# Customer profiles (issue #30): features as the decision log keeps them ([[namespace, name,
# value], ...]), as of the source's time (last writer by as_of wins), unused after expires_at.
profiles = Table(
    "profiles",
    metadata,
    Column("customer_id", String(256), primary_key=True),
    Column("features", JSON, nullable=False),
    Column("as_of", Double, nullable=False),
    Column("expires_at", Double),
    Column("updated_at", Double, nullable=False),
    # Only profiles that expire: most never do, and an index entry per write costs the loader.
    Index(
        "ix_profiles_expires", "expires_at", postgresql_where=text("expires_at IS NOT NULL"), sqlite_where=text("expires_at IS NOT NULL")
    ),
)

# Conversions from billing (issue #31): one row per conversion id (the idempotency key), naming
# an arm or a billing product code; ``credited`` is how many decisions it was credited to (0:
# unattributed, still counted for uplift against the holdout).
conversions = Table(
    "conversions",
    metadata,
    Column("conversion_id", String(256), primary_key=True),
    Column("customer_id", String(256), nullable=False),
    Column("arm_id", String(128), nullable=False, server_default=""),
    Column("product", String(128), nullable=False, server_default=""),
    Column("value", Double, nullable=False),
    Column("occurred_at", Double, nullable=False),
    Column("received_at", Double, nullable=False),
    Column("credited", Integer, nullable=False, server_default="0"),
    Index("ix_conversions_customer", "customer_id", "occurred_at"),
    Index("ix_conversions_occurred", "occurred_at"),
)

# The audit of attribution: which decisions (event_id, slot) a conversion was credited to, with
# the share and value each got (bandit.attribution.Credit).
conversion_credits = Table(
    "conversion_credits",
    metadata,
    Column("conversion_id", String(256), primary_key=True),
    Column("event_id", String(256), primary_key=True),
    Column("slot", Integer, primary_key=True, autoincrement=False),
    Column("placement_id", String(128), nullable=False),
    Column("arm_id", String(128), nullable=False),
    Column("share", Double, nullable=False),
    Column("value", Double, nullable=False),
    Index("ix_conversion_credits_event", "event_id", "slot"),
)

# Named counters; "learn_seq" hands out learn positions (atomically, to the one learner).
counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Values every server of a database must share, written once by whichever server is first
# (insert if absent, then read): "draw_seed", the secret salt of the per-event draws when the
# settings give no seed. Never logged, never sent to a caller.
server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

# One row per model of a placement, by its name: "" (the placement's own), a variant id, or "shadow:<id>".
snapshots = Table(
    "snapshots",
    metadata,
    Column("placement_id", String(128), primary_key=True),
    Column("model_name", String(80), primary_key=True),  # Snapshot.name: "", a variant id, "shadow:<id>"
    Column("model_key", JSON, nullable=False),
    Column("learned", BigInteger, nullable=False),
    Column("learn_seq", BigInteger, nullable=False),
    Column("model", LargeBinary, nullable=False),
    Column("created_at", Double, nullable=False),
)

__all__ = [
    "metadata",
    "placements",
    "arms",
    "arm_versions",
    "decisions",
    "campaigns",
    "budget_accounts",
    "budget_limits",
    "budget_leases",
    "reward_events",
    "counters",
    "snapshots",
    "server_secrets",
    "conversions",
    "conversion_credits",
]
