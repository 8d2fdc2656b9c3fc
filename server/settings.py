"""Server settings: one validated value, read once at start from flags, NEXTBEST_* variables
and an optional YAML file (flags win over the environment, which wins over the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the server can be told. See docs/operations.md "Server settings"."""

    model_config = SettingsConfigDict(env_prefix="NEXTBEST_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 50051  # 0 picks a free port
    db: str = "sqlite:///nextbest.db"
    # Salts the per-event random draws; decisions are reproducible from it. Empty: a random secret
    # kept in the database (server_secrets), the same for every server on it (Engine.seed).
    seed: str = ""
    flush_interval: Annotated[float, Field(gt=0, le=10)] = 0.05  # seconds between decision-log writes
    snapshot_every: Annotated[int, Field(ge=1)] = 1000  # learned examples between model snapshots
    snapshot_interval: Annotated[float, Field(gt=0)] = 5.0  # seconds between snapshots of a changed model
    learner: Literal["auto", "always", "never"] = "auto"  # auto: the first server to get the learner lock learns
    replica_poll_interval: Annotated[float, Field(gt=0, le=60)] = 2.0  # replicas reload models and config this often
    # ApplyConfig answers once every live server has loaded the change (PostgreSQL notifies them at
    # once; SQLite workers look every config_poll_interval), or after this long at most; 0: at once.
    config_confirm_wait: Annotated[float, Field(ge=0, le=60)] = 2.0
    config_poll_interval: Annotated[float, Field(gt=0, le=60)] = 0.2  # where no notification comes (SQLite)
    orphan_grace: Annotated[float, Field(ge=0)] = 60.0  # windows a stopped server left open are closed after this
    # A Reward for an event not yet in the database, where other servers share it, is looked
    # for again for up to this long (their group commit may not have run yet); 0: answer at once.
    peer_visibility_wait: Annotated[float, Field(ge=0, le=10)] = 0.3
    workers: Annotated[int, Field(ge=1, le=64)] = 1  # server processes sharing the port (SO_REUSEPORT)
    reuse_port: bool = False  # set for the worker processes of --workers
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None  # Prometheus metrics over HTTP; unset: off
    http_port: Annotated[int, Field(ge=0, le=65535)] | None = None  # HTTP/JSON door on host (same TLS, auth); unset: off
    sweep_interval: Annotated[float, Field(gt=0, le=60)] = 0.5  # how often expired reward windows are closed
    learn_batch: Annotated[int, Field(ge=1, le=100_000)] = 500
    # Contact policies and fatigue read a customer's impressions from "memory" (this server's,
    # exact with one server or routing by customer) or the "database" (exact across servers,
    # one short locked transaction per Choose of a tracked customer). auto: the database on
    # PostgreSQL or with --workers, else memory.
    contact_store: Literal["auto", "memory", "database"] = "auto"
    learn_cache: Annotated[int, Field(ge=0, le=10_000_000)] = 20_000  # recent examples' VW text kept for the learner (~1 KB each)
    budget_lease_fraction: Annotated[float, Field(gt=0, le=1)] = 0.05  # of a budget's limit leased at a time
    max_features: Annotated[int, Field(ge=1)] = 512
    max_reward_batch: Annotated[int, Field(ge=1, le=100_000)] = 1000  # rewards in one RewardBatch call
    max_profile_batch: Annotated[int, Field(ge=1, le=100_000)] = 1000  # profiles in one PutProfiles call
    # Stored profiles read by Choose (placements with context: {profile: true}) are cached this
    # long per customer: a profile written through another server or the loader is used within
    # it (a write through this server at once). Misses are read asynchronously, in batches.
    profile_cache_ttl: Annotated[float, Field(ge=0, le=3600)] = 5.0
    profile_cache_size: Annotated[int, Field(ge=0, le=10_000_000)] = 100_000  # customers cached
    max_id_length: Annotated[int, Field(ge=8, le=4096)] = 256
    max_message_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    max_name_length: Annotated[int, Field(ge=1, le=4096)] = 128  # feature namespace and name
    max_text_length: Annotated[int, Field(ge=1, le=65536)] = 1024  # a text feature's value
    max_abs_number: Annotated[float, Field(gt=0, le=1e15)] = 1e12  # VW is float32: 1e20 poisons a model
    max_inflight: Annotated[int, Field(ge=1)] = 256  # concurrent calls; more get RESOURCE_EXHAUSTED
    # grpc.aio's cap on the calls it has started (health included); past it, it stops taking calls
    # (they wait in gRPC's queue, not refused): a memory ceiling far above max_inflight; 0: none
    max_concurrent_rpcs: Annotated[int, Field(ge=0)] = 4096
    # past this wait in gRPC's queue (measured by a probe), calls are shed (server/rpc/overload.py);
    # 0 (the default): off. Opt-in: on 2 cores it shortened waits only for callers that back off,
    # at ~40% of accepted throughput (docs/operations.md "Overload protection"); a limiting proxy does better.
    shed_queue_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    auth_tokens_file: str = ""  # YAML list of token hashes and roles (server/rpc/auth.py); auth is on when any
    auth_tokens: str = ""  # name:role[+role]:sha256[:placement,...] entries separated by ";"
    tls_cert_file: str = ""  # PEM certificate (chain) of the gRPC port; with tls_key_file, TLS is on
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    metrics_host: str = ""  # address of the metrics port; empty: the same as host
    grace_period: Annotated[float, Field(ge=0)] = 10.0  # seconds to drain calls on SIGTERM
    init_config: str = ""  # apply file loaded when the database has no placement yet
    log_level: str = "INFO"

    @property
    def may_have_peers(self) -> bool:
        """Whether other servers may write the same database (PostgreSQL, or --workers)."""
        return self.db.startswith("postgresql") or self.workers > 1 or self.reuse_port

    @property
    def live_for(self) -> float:
        """How long a server's last heartbeat (one per replica poll) keeps it counted alive."""
        return max(10.0, 5 * self.replica_poll_interval)

    @property
    def shares_contacts(self) -> bool:
        """Whether contact history lives in the database (see contact_store)."""
        if self.contact_store != "auto":
            return self.contact_store == "database"
        return self.may_have_peers


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Settings from a YAML file, NEXTBEST_* variables and explicit overrides (flags)."""
    values: dict[str, Any] = {}
    if config_file:
        values = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_file}: expected a mapping of setting names to values")
    env = Settings()  # reads NEXTBEST_*
    merged = {**values, **{k: getattr(env, k) for k in env.model_fields_set}}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**merged)
