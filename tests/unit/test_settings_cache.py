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
