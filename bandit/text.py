"""Text that every store can keep, and input quoted back in bounded size.

SQLite stores any Python string, PostgreSQL does not: a NUL byte is refused in text columns
and as ``\\u0000`` in JSON, and a lone surrogate cannot even be encoded as UTF-8. One such
string let through at the edge used to fail every group commit after it (a wedged writer and
lost decisions), so every text field of a request is checked here, the same for every store.

Error messages quote what the caller sent, but at most a bounded prefix of it: gRPC carries
the message in a trailer, and one above ~16 KB turns the answer into RESOURCE_EXHAUSTED
("retry with backoff") instead of the INVALID_ARGUMENT the caller should read.
"""

from __future__ import annotations

from nextbest.bandit.errors import InvalidInput

QUOTE_LIMIT = 64  # characters of an input quoted back in an error message


def storable(text: str) -> bool:
    """Whether SQLite and PostgreSQL alike can store the text: no NUL, no lone surrogate."""
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: str, field: str, limit: int | None = None) -> None:
    """InvalidInput naming ``field`` for text no store can keep, or longer than ``limit``."""
    if limit is not None and len(text) > limit:
        raise InvalidInput(field, f"longer than {limit} characters")
    if not storable(text):
        raise InvalidInput(field, "contains a NUL character or a lone surrogate, which cannot be stored")


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of at most ``limit`` characters of the text, saying how long the rest was."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def first_unstorable(value: object, path: str = "") -> str | None:
    """The path of the first string (key or value) in nested dicts and lists that no store can
    keep, e.g. ``arms[1].features.name``; None when all can be stored. For config documents,
    which are validated as a whole before any of them is applied."""
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            if not storable(v):
                return p or "value"
        elif isinstance(v, dict):
            for k, item in v.items():
                key = str(k)
                if not storable(key):
                    return f"{p}.{quote(key)}" if p else quote(key)
                stack.append((item, f"{p}.{key}" if p else key))
        elif isinstance(v, list | tuple):
            stack.extend((item, f"{p}[{i}]") for i, item in enumerate(v))
    return None
