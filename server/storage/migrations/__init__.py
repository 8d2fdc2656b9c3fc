"""Alembic migrations of the SQL store schema; run by nextbest.storage.migrate, not by hand."""
