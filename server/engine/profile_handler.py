"""ProfileService's work (issue #30): validate profiles as Choose validates features, then put,
read or erase them in the store from a worker thread, so that the event loop never waits on
the database. A batch is checked whole before anything is written."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence

from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.features import feature_key
from nextbest.bandit.text import check_text, quote
from nextbest.engine.choose_checks import ChooseChecks
from nextbest.settings import Settings
from nextbest.storage.base import Erased, Profile, ProfilesPut, Store

OnWritten = Callable[[Collection[str]], None]


class ProfileHandler:
    """Puts, gets and deletes customer profiles. ``on_written`` (optional) is told, on the
    event loop, the customers whose stored profile a call may have changed (a cache drops them)."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        clock: Callable[[], float],
        checks: ChooseChecks | None = None,
        on_written: OnWritten | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._checks = checks if checks is not None else ChooseChecks(settings)
        self.now = clock
        self.on_written = on_written

    def check_batch(self, size: int) -> None:
        """INVALID_ARGUMENT for a batch above max_profile_batch, before it is converted."""
        limit = self._settings.max_profile_batch
        if size > limit:
            raise InvalidInput("profiles", f"{size} profiles, more than max_profile_batch ({limit}); send smaller batches")

    def validate(self, profiles: Sequence[Profile], field: str = "profiles") -> None:
        """Every profile as a Choose's customer id and features, each feature named once."""
        self.check_batch(len(profiles))
        for i, p in enumerate(profiles):
            self._customer_id(p.customer_id, f"{field}[{i}].customer_id")
            at = f"{field}[{i}].features"
            self._checks.validate_features(p.features, at)
            seen: dict[tuple[str, str], int] = {}
            for j, (namespace, name, _) in enumerate(p.features):
                first = seen.setdefault((namespace, name), j)
                if first != j:
                    key = feature_key((namespace, name, 0.0))
                    raise InvalidInput(f"{at}[{j}].name", f"{quote(key)} is also {at}[{first}]; name each feature once")

    def _customer_id(self, customer_id: str, field: str) -> None:
        if not customer_id:
            raise InvalidInput(field, "must not be empty")
        check_text(customer_id, field, self._settings.max_id_length)

    async def put(self, profiles: Sequence[Profile]) -> ProfilesPut:
        """Validate all, then write all in one transaction (or nothing)."""
        self.validate(profiles)
        if not profiles:
            return ProfilesPut()
        now = self.now()
        try:
            return await asyncio.to_thread(self._store.put_profiles, profiles, now)
        finally:  # also when the commit's outcome is unknown: a cache reading again is harmless
            self._written([p.customer_id for p in profiles])

    async def get(self, customer_id: str) -> Profile:
        """The stored profile; NotFound when there is none or it expired."""
        self._customer_id(customer_id, "customer_id")
        now = self.now()
        found = await asyncio.to_thread(self._store.get_profiles, (customer_id,), now)
        profile = found.get(customer_id)
        if profile is None:
            raise NotFound(f"no profile for customer {quote(customer_id)} (none stored, or it expired)")
        return profile

    async def delete(self, customer_id: str, erase_decisions: bool = False) -> Erased:
        """Delete the profile; with ``erase_decisions`` erase the customer (Store.erase_customer)."""
        self._customer_id(customer_id, "customer_id")
        try:
            if erase_decisions:
                return await asyncio.to_thread(self._store.erase_customer, customer_id)
            return Erased(profiles=await asyncio.to_thread(self._store.delete_profiles, (customer_id,)))
        finally:
            self._written((customer_id,))

    def _written(self, customer_ids: Collection[str]) -> None:
        if self.on_written is not None:
            self.on_written(customer_ids)
