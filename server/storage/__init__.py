"""Storage behind one interface (base.Store) with one SQL implementation for SQLite and PostgreSQL."""

from server.storage.base import ArmTally, Close, PlacementRecord, Snapshot, Store
from server.storage.sql import SqlStore, open_store

__all__ = ["ArmTally", "Close", "PlacementRecord", "Snapshot", "Store", "SqlStore", "open_store"]
