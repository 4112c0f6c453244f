"""Stored cascade inputs on SQLite and PostgreSQL: BYOLLM keys encrypted at rest, masked, rotatable."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text

from metering.crypto import SecretBox, generate_key
from metering.errors import InvalidInputError
from metering.llm import settings_store as store
from metering.llm.budgets import BudgetMode
from metering.llm.resolution import FallbackPolicy
from metering.llm.settings_source import CachedSettings

KEY = "sk-ant-api03-VERYSECRET-abcd"


@pytest.fixture
def box() -> SecretBox:
    return SecretBox([generate_key()])


def test_byollm_key_is_encrypted_at_rest_and_round_trips(session_factory, box) -> None:
    with session_factory() as session:
        store.put_byollm(
            session,
            box,
            user_id="u1",
            tenant_id="t1",
            provider="anthropic",
            model="claude-haiku-4-5",
            api_key=KEY,
            fallback_policy="error",
        )
        session.commit()
    with session_factory() as session:
        raw = session.execute(text("SELECT api_key_ciphertext FROM byollm_settings")).scalar_one()
        assert KEY.encode() not in bytes(raw)
    source = store.DatabaseSettings(session_factory, box)
    settings = source.byollm("u1", "t1")
    assert settings is not None
    assert settings.api_key == KEY and settings.fallback_policy is FallbackPolicy.ERROR
    assert KEY not in repr(settings)
    assert store.mask_key(KEY) == "sk-…abcd"
    # A short key's mask shows nothing of it: 3 + 4 characters of an 11-character key left 4 to guess.
    assert store.mask_key("sk-12345678") == "…"
    assert store.mask_key("sk-" + "x" * 15 + "abcd") == "…"  # 15 hidden: not enough
    assert store.mask_key("sk-" + "x" * 16 + "abcd") == "sk-…abcd"  # 16 hidden


def test_a_key_set_while_a_rotation_runs_is_never_overwritten_by_the_old_one(session_factory) -> None:
    """`keys rotate` read every stored key, then wrote each back re-encrypted: a user's key set meanwhile (the API, the
    CLI) was overwritten by the rotated old key, silently. The rotation now locks what it re-encrypts: the new key
    waits for it and stands."""
    import threading

    old_key, new_key = generate_key(), generate_key()
    with session_factory() as session:
        store.put_byollm(
            session, SecretBox([old_key]), user_id="u1", tenant_id="t1", provider="openai", model="m", api_key=KEY
        )
        session.commit()

    def set_new_key() -> None:
        with session_factory() as other:
            store.put_byollm(
                other, SecretBox([new_key, old_key]), user_id="u1", tenant_id="t1", provider="openai", model="m",
                api_key="sk-NEW-KEY-0001",
            )  # fmt: skip
            other.commit()

    class RotatingBox(SecretBox):
        def rotate(self, token: bytes) -> bytes:
            writer.start()  # the user sets a new key while the rotation is under way
            writer.join(timeout=2)  # done at once unless the rotation locks the row (then it waits for our commit)
            return super().rotate(token)

    writer = threading.Thread(target=set_new_key)
    with session_factory() as session:
        assert store.rotate_byollm_keys(session, RotatingBox([new_key, old_key])).reencrypted == 1
        session.commit()
    writer.join(timeout=30)
    settings = store.DatabaseSettings(session_factory, SecretBox([new_key, old_key])).byollm("u1", "t1")
    assert settings is not None and settings.api_key == "sk-NEW-KEY-0001"


def test_rotation_re_encrypts_under_the_new_key(session_factory) -> None:
    old_key, new_key = generate_key(), generate_key()
    with session_factory() as session:
        store.put_byollm(
            session, SecretBox([old_key]), user_id="u1", tenant_id="t1", provider="openai", model="gpt-4o", api_key=KEY
        )
        session.commit()
    with session_factory() as session:
        assert store.rotate_byollm_keys(session, SecretBox([new_key, old_key])).reencrypted == 1
        session.commit()
    settings = store.DatabaseSettings(session_factory, SecretBox([new_key])).byollm("u1", "t1")
    assert settings is not None and settings.api_key == KEY and not settings.key_unreadable
    stale = store.DatabaseSettings(session_factory, SecretBox([old_key])).byollm("u1", "t1")  # re-encrypted: not old
    assert stale is not None and stale.key_unreadable and stale.api_key is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"provider": "gemini", "model": "x", "api_key": "k"}, "unknown provider"),
        ({"provider": "openai", "model": "x", "api_key": None}, "needs an api_key"),
        ({"provider": "openai_compatible", "model": "llama3", "api_key": None}, "needs a base_url"),
        ({"provider": "openai_compatible", "model": "llama3", "api_key": None, "base_url": "ftp://x"}, "http"),
        (
            {"provider": "openai_compatible", "model": "llama3", "api_key": None, "base_url": "http://u:pw@h:11434/v1"},
            "must not carry credentials",
        ),
        ({"provider": "openai", "model": "x", "api_key": "k", "base_url": "http://h:99999/v1"}, "not a valid URL"),
        ({"provider": "openai", "model": "x", "api_key": "k", "base_url": "http://h:port/v1"}, "not a valid URL"),
        ({"provider": "openai", "model": "x", "api_key": "k", "base_url": "http://bad_\u00fc.example"}, "not a valid"),
        ({"provider": "openai", "model": "x", "api_key": "k", "base_url": "http://[::1/v1"}, "not a valid URL"),
        ({"provider": "openai", "model": "x", "api_key": "sk-copied\u2026abcd"}, "printable ASCII"),
        ({"provider": "openai", "model": "x", "api_key": "sk-pasted-with-its-newline\n"}, "printable ASCII"),
        ({"provider": "anthropic", "model": "x", "api_key": "sk-ant one"}, "printable ASCII"),
        ({"provider": "openai", "model": "x", "api_key": "k", "fallback_policy": "maybe"}, "fallback_policy"),
        ({"provider": "openai", "model": " ", "api_key": "k"}, "model must not be empty"),
    ],
)
def test_bad_byollm_settings_are_refused_with_a_reason(session_factory, box, kwargs, message) -> None:
    with session_factory() as session, pytest.raises(InvalidInputError, match=message):
        store.put_byollm(session, box, user_id="u1", tenant_id="t1", **kwargs)


def test_purpose_and_budget_round_trip_through_the_cache(session_factory, box) -> None:
    with session_factory() as session:
        store.put_purpose(
            session, purpose="content_rewrite", provider="anthropic", model="claude-haiku-4-5", params={"top_p": 0.9}
        )
        store.put_budget(session, extension_id="rewrite", max_calls=5, max_tokens=None, mode="enforce")
        session.commit()
    now = [0.0]
    cached = CachedSettings(store.DatabaseSettings(session_factory, box), ttl_s=5.0, clock=lambda: now[0])
    purpose = cached.purpose("content_rewrite")
    assert purpose is not None and purpose.model == "claude-haiku-4-5" and dict(purpose.params) == {"top_p": 0.9}
    budget = cached.budget("rewrite")
    assert budget is not None and budget.max_calls == 5 and budget.mode is BudgetMode.ENFORCE
    with session_factory() as session:
        store.delete_purpose(session, "content_rewrite")
        session.commit()
    assert cached.purpose("content_rewrite") is not None  # still cached
    now[0] = 6.0
    assert cached.purpose("content_rewrite") is None  # seen after the TTL


def test_a_load_overtaken_by_an_invalidation_is_not_cached(session_factory, box) -> None:
    """An invocation read a user's BYOLLM row while an admin's DELETE committed and invalidated the cache (the API
    invalidates in a background task once the change committed; the read runs on the event loop meanwhile): the read
    then stored the deleted settings, key included, and every invocation for another TTL spent the removed key,
    though docs/api.md promises the next invocation uses the change."""
    with session_factory() as session:
        store.put_byollm(session, box, user_id="u1", tenant_id="t1", provider="anthropic", model="m", api_key=KEY)
        session.commit()
    database = store.DatabaseSettings(session_factory, box)
    now = [0.0]

    class ReadThenOvertaken:
        def __init__(self) -> None:
            self.overtake = True

        def byollm(self, user_id: str, tenant_id: str):  # type: ignore[no-untyped-def]
            read = database.byollm(user_id, tenant_id)  # the row as it was
            if self.overtake:
                self.overtake = False
                with session_factory() as session:  # the admin's DELETE commits, then the cache is invalidated
                    store.delete_byollm(session, user_id)
                    session.commit()
                cached.invalidate()
            return read

        def purpose(self, purpose: str):  # type: ignore[no-untyped-def]
            return database.purpose(purpose)

        def budget(self, extension_id: str):  # type: ignore[no-untyped-def]
            return database.budget(extension_id)

    cached = CachedSettings(ReadThenOvertaken(), ttl_s=5.0, clock=lambda: now[0])
    in_flight = cached.byollm("u1", "t1")
    assert in_flight is not None and in_flight.api_key == KEY  # the invocation under way had read it
    assert cached.byollm("u1", "t1") is None  # the next one sees the delete, within the TTL


def test_budget_needs_a_limit(session_factory) -> None:
    with session_factory() as session, pytest.raises(InvalidInputError, match="max_calls, max_tokens"):
        store.put_budget(session, extension_id="rewrite", max_calls=None, max_tokens=None)


@pytest.mark.parametrize("kind", ["purpose", "budget", "byollm", "override"])
def test_two_requests_creating_one_row_at_once_give_one_row_and_a_conflict(session_factory, box, kind) -> None:
    """Both find no row, both insert: the second was a 500 (IntegrityError); it is a ConflictError (409, retry).
    For BYOLLM the two requests are two tenants claiming one user id (found by a hunt)."""
    import threading
    import time
    from datetime import UTC, datetime
    from decimal import Decimal

    from metering.billing.overrides import add_override
    from metering.errors import ConflictError

    def create(session, n: int) -> None:
        if kind == "purpose":
            store.put_purpose(session, purpose="p", provider="simulated", model=f"m{n}")
        elif kind == "budget":
            store.put_budget(session, extension_id="ext", max_calls=n + 1, max_tokens=None)
        elif kind == "byollm":
            store.put_byollm(
                session, box, user_id="alice", tenant_id=f"t{n}", provider="simulated", model="m", api_key=None
            )
        else:
            at = datetime(2026, 1, 1, tzinfo=UTC)
            add_override(session, id="o", provider="ollama", model_pattern="*", effective_from=at, effective_to=None,
                         input_mtok=Decimal(n), output_mtok=Decimal(0))  # fmt: skip

    errors: list[BaseException] = []

    def second() -> None:
        try:
            with session_factory() as session:
                create(session, 2)
                session.commit()
        except BaseException as exc:
            errors.append(exc)

    with session_factory() as first:
        create(first, 1)  # flushed: its row is in, not committed
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)  # the second request has looked (no row) and waits on the first one's insert
        first.commit()
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], ConflictError), errors


def test_another_tenants_byollm_settings_are_never_loaded_nor_decrypted(session_factory) -> None:
    """User ids are global: tenant B's call for its own 'u1' decrypted tenant A's row (and failed with a
    secret_error when A's key could not be decrypted, telling B that 'u1' exists elsewhere). Found by a hunt."""
    with session_factory() as session:
        store.put_byollm(
            session, SecretBox([generate_key()]), user_id="u1", tenant_id="t1", provider="openai", model="m",
            api_key=KEY,
        )  # fmt: skip
        session.commit()
    other_keys = store.DatabaseSettings(session_factory, SecretBox([generate_key()]))  # cannot decrypt t1's key
    assert other_keys.byollm("u1", "t2") is None
    own = other_keys.byollm("u1", "t1")  # its own tenant's: the key cannot be decrypted (each call fails with that)
    assert own is not None and own.key_unreadable and own.api_key is None
    assert CachedSettings(other_keys).byollm("u1", "t2") is None


def test_ids_are_stored_exactly_and_a_blank_one_is_refused(session_factory, box) -> None:
    """Ids were stripped by the store while the edges audited and checked the id as given: 'summ ' replaced 'summ'
    with an audit entry naming 'summ ' and no before (found by a review). Ids are exact, as in usage events."""
    with session_factory() as session:
        store.put_purpose(session, purpose="summ", provider="simulated", model="m1")
        store.put_purpose(session, purpose="summ ", provider="simulated", model=" m2 ")
        session.commit()
        rows = {row.purpose: row.model for row in store.list_purposes(session)}
    assert rows == {"summ": "m1", "summ ": "m2"}  # a model name is stripped
    with session_factory() as session, pytest.raises(InvalidInputError, match="must not be empty"):
        store.put_budget(session, extension_id="  ", max_calls=1, max_tokens=None)


def test_a_stored_purpose_with_params_now_refused_still_loads_with_a_warning(session_factory, box, caplog) -> None:
    """Settings stored before such params were refused (`max_tokens`, `stop` on anthropic: dropped at every call) load
    as before, never failing the purpose's calls; a warning names them, once per purpose and names, not at each
    reload."""
    with session_factory() as session:
        row = store.put_purpose(session, purpose="p", provider="anthropic", model="m", params={"top_p": 0.9})
        row.params = {"top_p": 0.9, "max_tokens": 100, "stop": ["END"]}  # as stored before
        session.commit()
    source = store.DatabaseSettings(session_factory, box)
    with caplog.at_level(logging.WARNING, logger="metering.llm"):
        for _ in range(3):
            purpose = source.purpose("p")
            assert purpose is not None and dict(purpose.params) == {"top_p": 0.9, "max_tokens": 100, "stop": ["END"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "purpose 'p'" in warnings[0] and "params.max_tokens" in warnings[0] and "stop_sequences" in warnings[0]
