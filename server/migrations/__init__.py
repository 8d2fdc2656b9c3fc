"""Alembic migrations of the SQL store schema; run by server.storage.migrate, not by hand."""
