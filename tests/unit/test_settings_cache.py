"""CachedSettings telling the provider pool of a BYOLLM key that a reload found replaced (pure: no pool, no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from metering.llm.resolution import ByollmSettings
from metering.llm.settings_source import CachedSettings, InMemorySettings

OWN = ByollmSettings("u1", "t1", "openai", "gpt-4o", "sk-old-0123456789")


def test_a_failing_retirement_never_fails_the_reload(caplog: pytest.LogCaptureFixture) -> None:
    """Retiring the old key's adapters is tidying up: the call being resolved gets the new settings whatever it does."""
    source = InMemorySettings(byollm_by_user={"u1": OWN})

    def broken(api_key: str) -> None:
        raise RuntimeError("pool bug")

    cached = CachedSettings(source, ttl_s=5.0, clock=lambda: 0.0, on_key_replaced=broken)
    assert cached.byollm("u1", "t1") is OWN
    new = source.byollm_by_user["u1"] = dataclasses.replace(OWN, api_key="sk-new-0123456789")
    cached.invalidate()
    assert cached.byollm("u1", "t1") is new
    assert "retiring the adapters of a replaced BYOLLM key failed" in caplog.text
    assert "sk-old" not in caplog.text


def test_only_a_key_the_user_no_longer_has_is_retired() -> None:
    source = InMemorySettings(byollm_by_user={"u1": OWN})
    retired: list[str] = []
    cached = CachedSettings(source, ttl_s=5.0, clock=lambda: 0.0, on_key_replaced=retired.append)
    cached.byollm("u1", "t1")
    source.byollm_by_user["u1"] = dataclasses.replace(OWN, model="gpt-4o-mini")  # same key
    cached.invalidate()
    cached.byollm("u1", "t1")
    assert retired == []
    del source.byollm_by_user["u1"]
    cached.invalidate()
    assert cached.byollm("u1", "t1") is None
    assert retired == [OWN.api_key]


def test_invalidate_keeps_only_the_keys_a_reload_compares() -> None:
    """invalidate() used to clear the cache; since 8ce9165 it kept every entry (expired), so the entries of every user,
    purpose and extension ever resolved stayed for the life of the process. Only a user's key is compared on reload."""
    source = InMemorySettings(byollm_by_user={"u1": OWN})
    cached = CachedSettings(source, ttl_s=5.0, clock=lambda: 0.0)
    for n in range(50):
        cached.byollm(f"user-{n}", "t1")  # no BYOLLM settings
        cached.purpose(f"purpose-{n}")
        cached.budget(f"extension-{n}")
    cached.byollm("u1", "t1")
    cached.invalidate()
    assert len(cached) == 1


def test_a_key_retired_here_is_forgotten() -> None:
    """A key this process replaced or deleted (an admin write: the runtime retires its adapters itself) is not held,
    expired, until its user calls again, which a deleted user may never do."""
    source = InMemorySettings(byollm_by_user={"u1": OWN, "u2": dataclasses.replace(OWN, user_id="u2", api_key="sk-2")})
    retired: list[str] = []
    cached = CachedSettings(source, ttl_s=5.0, clock=lambda: 0.0, on_key_replaced=retired.append)
    cached.byollm("u1", "t1")
    cached.byollm("u2", "t1")
    del source.byollm_by_user["u1"]
    cached.invalidate()
    cached.forget_key(OWN.api_key)
    assert len(cached) == 1  # u2's entry, still compared when it reloads
    assert cached.byollm("u1", "t1") is None
    assert retired == []  # retired by the writer already
