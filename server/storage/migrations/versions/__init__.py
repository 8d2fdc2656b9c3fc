"""Schema revisions, oldest first (0001, 0002, ...); new ones come from scripts/db-revision."""
