"""Bearer-token authentication and roles for the nextbest services.

Tokens are configured by their SHA-256 (hex), never in clear, in a YAML file and/or the
``NEXTBEST_AUTH_TOKENS`` variable; the server only ever sees the hash, and logs name the
token (its ``name``), never its value. Authentication is on as soon as one token is
configured. Health and reflection stay open so that load balancers and tools keep working.

File (``auth_tokens_file``)::

    tokens:
      - name: mobile-app                    # appears in logs
        sha256: 5e8848...                   # sha256 hex of the token
        roles: [channel]                    # channel: DecisionService; admin: AdminService, Explain,
                                            # ProfileService, ReportConversions; data: ProfileService
                                            # and ReportConversions only (loaders, billing feeds)
        placements: [app_home_banner]       # optional: a channel token limited to these

Variable: ``name:role[+role]:sha256[:placement,placement]`` entries separated by ``;``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import yaml

from nextbest.bandit import access
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.text import quote

log = logging.getLogger("nextbest.auth")

CHANNEL, ADMIN, DATA = "channel", "admin", "data"
ROLES = frozenset({CHANNEL, ADMIN, DATA})
DECISION_SERVICE = "/nextbest.v1.DecisionService/"
ADMIN_SERVICE = "/nextbest.v1.AdminService/"
PROFILE_SERVICE = "/nextbest.v1.ProfileService/"
_HEX = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def hash_token(token: str) -> str:
    """The form a token is configured in."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid token speaks for."""

    name: str
    roles: frozenset[str]
    placements: frozenset[str] | None = None  # None: every placement

    def may_use(self, placement: str) -> bool:
        return self.placements is None or placement in self.placements


class TokenTable:
    """Token hashes to principals; empty means authentication is off."""

    def __init__(self, principals: Mapping[str, Principal] | None = None) -> None:
        self._by_hash = dict(principals or {})

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal | None:
        """The principal of the ``authorization: Bearer <token>`` metadata, if valid."""
        for key, value in metadata or ():
            if key.lower() != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            digest = hash_token(token.strip())
            for known, principal in self._by_hash.items():  # constant time per entry
                if hmac.compare_digest(known, digest):
                    return principal
            return None
        return None


def _entry(raw: object, where: str) -> tuple[str, Principal]:
    if not isinstance(raw, dict):
        raise InvalidInput(where, "must be a mapping with name, sha256 and roles")
    unknown = set(raw) - {"name", "sha256", "roles", "role", "placements"}
    if unknown:
        raise InvalidInput(f"{where}.{min(map(str, unknown))}", "unknown field")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"{where}.name", "letters, digits, _ . @ - (1 to 128)")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not _HEX.fullmatch(digest.lower()):
        raise InvalidInput(f"{where}.sha256", "must be 64 hex digits: the SHA-256 of the token, not the token")
    roles = raw.get("roles", raw.get("role"))
    roles = [roles] if isinstance(roles, str) else roles
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r in ROLES for r in roles):
        raise InvalidInput(f"{where}.roles", f"list one or more of {sorted(ROLES)}")
    places = raw.get("placements")
    if places is not None and (not isinstance(places, list) or not places or not all(isinstance(p, str) and p for p in places)):
        raise InvalidInput(f"{where}.placements", "a non-empty list of placement ids")
    return digest.lower(), Principal(name, frozenset(roles), frozenset(places) if places is not None else None)


def parse_entries(entries: Iterable[object], source: str) -> dict[str, Principal]:
    out: dict[str, Principal] = {}
    names: set[str] = set()
    for i, raw in enumerate(entries):
        digest, principal = _entry(raw, f"{source}: tokens[{i}]")
        if digest in out or principal.name in names:
            raise InvalidInput(f"{source}: tokens[{i}]", "the same token or name is configured twice")
        out[digest] = principal
        names.add(principal.name)
    return out


def parse_file(text: str, source: str = "auth_tokens_file") -> dict[str, Principal]:
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise InvalidInput(source, f"not valid YAML: {e.__class__.__name__}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict) or set(doc) != {"tokens"} or not isinstance(doc["tokens"], list | None):
        raise InvalidInput(source, "expected a mapping with one key, tokens: a list")
    return parse_entries(doc["tokens"] or [], source)


def parse_env(value: str, source: str = "NEXTBEST_AUTH_TOKENS") -> dict[str, Principal]:
    entries: list[object] = []
    for i, item in enumerate(x.strip() for x in re.split(r"[;\n]", value)):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise InvalidInput(f"{source}: entry {i + 1}", "write name:role[+role]:sha256[:placement,placement]")
        entry: dict[str, object] = {"name": parts[0], "roles": parts[1].split("+"), "sha256": parts[2]}
        if len(parts) == 4:
            entry["placements"] = [p.strip() for p in parts[3].split(",")]
        entries.append(entry)
    return parse_entries(entries, source)


def load_tokens(file: str = "", env_value: str = "") -> TokenTable:
    """Tokens from the file and the variable together; a hash or name in both is an error."""
    table = parse_file(Path(file).read_text(), file) if file else {}
    more = parse_env(env_value) if env_value else {}
    clash = set(table) & set(more) or {p.name for p in table.values()} & {p.name for p in more.values()}
    if clash:
        raise InvalidInput("NEXTBEST_AUTH_TOKENS", "a token or name is also in the tokens file")
    return TokenTable({**table, **more})


# Methods open to more than one role. Explain reads a decision back: the channel that made it
# may ask why (for its own placements), and so may an operator with an admin token.
# ReportConversions is a billing feed's, neither a channel's nor only an operator's: the loaders'
# "data" role, or an operator.
_ROLES_OF: dict[str, frozenset[str]] = {
    DECISION_SERVICE + "Explain": frozenset({CHANNEL, ADMIN}),
    DECISION_SERVICE + "ReportConversions": frozenset({DATA, ADMIN}),
}


def allowed_roles(method: str) -> frozenset[str] | None:
    """The roles that may call a method (any one suffices); None for the open services (health,
    reflection)."""
    if method in _ROLES_OF:
        return _ROLES_OF[method]
    if method.startswith(DECISION_SERVICE):
        return frozenset({CHANNEL})
    if method.startswith(ADMIN_SERVICE):
        return frozenset({ADMIN})
    if method.startswith(PROFILE_SERVICE):  # customer data: the loaders' "data" role, or an operator
        return frozenset({DATA, ADMIN})
    return None


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def deny(request: object, context: Ctx) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """UNAUTHENTICATED without a valid token, PERMISSION_DENIED for a wrong role or placement."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        roles = allowed_roles(method)
        if roles is None or not self._tokens:
            return await continuation(details)
        principal = self._tokens.authenticate(details.invocation_metadata)
        if principal is None:
            log.info("unauthenticated call to %s", method, extra={"event": "auth_unauthenticated", "method": method})
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "send a valid token as 'authorization: Bearer <token>'")
        if not roles & principal.roles:
            need = " or ".join(repr(r) for r in sorted(roles))
            log.info(
                "denied %s to token %s: needs role %s",
                method,
                principal.name,
                need,
                extra={"event": "auth_denied", "method": method, "principal": principal.name},
            )
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"token {principal.name!r} lacks role {need}")
        handler = await continuation(details)
        # An admin token acts on every placement; a placement list limits a channel token.
        if ADMIN in roles & principal.roles or principal.placements is None or handler is None or handler.unary_unary is None:
            return handler
        return handler._replace(unary_unary=self._placement_guard(handler.unary_unary, principal, method))

    def _placement_guard(
        self, behavior: Callable[[Any, Ctx], Awaitable[Any]], principal: Principal, method: str
    ) -> Callable[[Any, Ctx], Awaitable[Any]]:
        """Choose names its placement: checked here. Reward, RewardBatch, Activate and Explain
        name events, whose placement the engine reads when it finds them: it checks the scope set
        here on that same read (bandit/access.py), so no second read can disagree with it."""
        assert principal.placements is not None
        scope = access.Scope(principal.name, principal.placements)

        async def guarded(request: Any, context: Ctx) -> Any:
            if method.endswith("/Choose"):
                placement = getattr(request, "placement", "")
                if placement and not principal.may_use(placement):
                    log.info(
                        "denied %s on placement %s to token %s",
                        method,
                        quote(placement),
                        principal.name,
                        extra={"event": "auth_denied", "method": method, "principal": principal.name, "placement": placement[:128]},
                    )
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"token {principal.name!r} may not use placement {quote(placement)}",
                    )
            token = access.current.set(scope)
            try:
                return await behavior(request, context)
            finally:
                access.current.reset(token)

        return guarded


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Client side: sends the token with every call (wrap a channel with grpc.intercept_channel)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        new = _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return continuation(new, request)


def main(argv: list[str] | None = None) -> int:
    """``python -m nextbest.rpc.auth [--new]``: the hash of a token read from stdin, or a new token."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--new"]:
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}\nsha256: {hash_token(token)}")
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        print("usage: echo TOKEN | python -m nextbest.rpc.auth   or   python -m nextbest.rpc.auth --new", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
