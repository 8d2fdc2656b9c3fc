"""Storage behind one interface (``base.Store``) with one SQL implementation for SQLite and PostgreSQL
(``sql.SqlStore``, opened by ``sql.open_store``). Empty on purpose: importing ``nextbest.storage.base``
must not load SQLAlchemy (the client uses its record types)."""
