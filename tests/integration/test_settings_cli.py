"""`metering purpose / byollm / budget set` (in-process) apply the rules the admin API applies, on both databases."""

from __future__ import annotations

from click.testing import Result
from sqlalchemy import select

from metering.db.models import ByollmSettingsRow, PurposeSettingsRow


def refused(result: Result, *needles: str) -> None:
    """Exit 1 with a one-line ``error:`` naming the reason; never a traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") <= 2, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_purpose_params_named_like_secrets_are_refused_as_by_the_api(run, session_factory) -> None:
    params = '{"api_key": "sk-live-SECRET", "nested": {"token": "t0k"}, "top_p": 0.9}'
    done = run("purpose", "set", "leaky", "--provider", "openai", "--model", "gpt-4o-mini", "--params", params)
    refused(done, "params.api_key, params.nested.token", "stored and shown in clear", "[invalid_input]")
    assert "sk-live-SECRET" not in done.output
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []
    ok = run("purpose", "set", "fine", "--provider", "openai", "--model", "m", "--params", '{"api_key": null}')
    assert ok.exit_code == 0, ok.output  # a null (no secret) is fine, as in the API


def test_purpose_params_the_provider_would_drop_are_refused_as_by_the_api(run, session_factory) -> None:
    """`max_tokens` (each call sends its own) and `stop` on an anthropic purpose (it takes `stop_sequences`) were
    stored and dropped at every call; refused, naming each and what to do."""
    params = '{"max_tokens": 100, "stop": ["END"]}'
    done = run("purpose", "set", "p", "--provider", "anthropic", "--model", "m", "--params", params)
    refused(done, "params.max_tokens: a purpose cannot cap", "--max-tokens N --mode enforce",
            "params.stop: anthropic takes it as 'stop_sequences'", "[invalid_input]")  # fmt: skip
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []
    ok = run(
        "purpose", "set", "p", "--provider", "anthropic", "--model", "m", "--params", '{"stop_sequences": ["END"]}'
    )
    assert ok.exit_code == 0, ok.output


def test_purpose_params_with_numbers_json_cannot_hold_are_refused(run, session_factory) -> None:
    """json.loads reads NaN, Infinity and 1e999: PostgreSQL refused the row (a traceback), SQLite stored it."""
    for params, where in (('{"top_p": NaN}', "params.top_p"), ('{"a": [1, {"b": -Infinity}]}', "params.a[1].b"),
                          ('{"top_p": 1e999}', "params.top_p")):  # fmt: skip
        done = run("purpose", "set", "p", "--provider", "openai", "--model", "m", "--params", params)
        refused(done, f"{where}: a number must be finite", "[invalid_input]")
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []


def test_purpose_params_with_text_that_is_not_unicode_are_refused(run, session_factory) -> None:
    """json.loads reads a lone surrogate escape ("\\ud83d", half an emoji), which the API's parser refuses: PostgreSQL
    refused the row (a traceback), SQLite stored it, and every call of the purpose then failed in the SDK (an internal
    error event, no call made)."""
    params = '{"stop": ["\\ud83d"]}'
    done = run("purpose", "set", "p", "--provider", "openai", "--model", "m", "--params", params)
    refused(done, "params.stop[0]", "not valid Unicode", "[invalid_input]")
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []


def test_a_base_url_with_a_key_in_its_query_is_refused(run, session_factory) -> None:
    """A base_url is stored, shown and audited in clear: a key in its query (`?api_key=`, `?key=`) was kept there."""
    for url in ("https://gw.example.com/v1?api_key=sk-live-SECRET", "https://gw.example.com/v1?v=2&key=AIzaSECRET"):
        done = run("purpose", "set", "p", "--provider", "openai_compatible", "--model", "m", "--base-url", url)
        refused(done, "must not carry credentials", "[invalid_input]")
        done = run("byollm", "set", "-u", "u", "-t", "t", "--provider", "openai_compatible", "--model", "m",
                   "--base-url", url)  # fmt: skip
        refused(done, "must not carry credentials", "[invalid_input]")
        assert "SECRET" not in done.output
    fine = "https://gw.example.com/v1?api-version=2024-06-01"
    done = run("purpose", "set", "p", "--provider", "openai_compatible", "--model", "m", "--base-url", fine)
    assert done.exit_code == 0, done.output
    with session_factory() as session:
        assert [row.base_url for row in session.scalars(select(PurposeSettingsRow))] == [fine]
        assert session.scalars(select(ByollmSettingsRow)).all() == []


def test_purpose_params_nested_deeper_than_the_api_takes_are_refused(run, session_factory) -> None:
    """64 levels (the params object the first), as the API: deeper was stored by the CLI, and thousands of levels were
    a traceback (RecursionError in json.loads)."""

    def nested(levels: int) -> str:  # the params object, then levels - 1 lists
        return '{"a": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"

    done = run("purpose", "set", "p", "--provider", "simulated", "--model", "m", "--params", nested(65))
    refused(done, "params nest deeper than 64 levels", "[invalid_input]")
    refused(run("purpose", "set", "p", "--provider", "simulated", "--model", "m", "--params", nested(20_000)),
            "--params is not valid JSON")  # fmt: skip
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []
    assert run("purpose", "set", "p", "--provider", "simulated", "--model", "m", "--params", nested(64)).exit_code == 0


def test_byollm_set_never_moves_a_user_to_another_tenant(run, session_factory) -> None:
    assert run("byollm", "set", "-u", "carol", "-t", "acme", "--provider", "simulated", "--model", "m1").exit_code == 0
    moved = run("byollm", "set", "-u", "carol", "-t", "globex", "--provider", "simulated", "--model", "m2")
    refused(moved, "'carol' has BYOLLM settings under another tenant", "[conflict]")
    with session_factory() as session:
        row = session.get(ByollmSettingsRow, "carol")
        assert row is not None and (row.tenant_id, row.model) == ("acme", "m1")
    again = run("byollm", "set", "-u", "carol", "-t", "acme", "--provider", "simulated", "--model", "m3")
    assert again.exit_code == 0, again.output  # its own tenant: replaced
    assert run("byollm", "delete", "-u", "carol").exit_code == 0
    moved = run("byollm", "set", "-u", "carol", "-t", "globex", "--provider", "simulated", "--model", "m2")
    assert moved.exit_code == 0, moved.output  # deleted first: set under the other tenant


def test_names_and_numbers_beyond_their_columns_are_refused_as_by_the_api(run, session_factory) -> None:
    """PostgreSQL answered with a traceback (StringDataRightTruncation, NumericValueOutOfRange); SQLite stored them."""
    long = "x" * 201
    simulated = ("--provider", "simulated", "--model")
    refused(run("byollm", "set", "-u", long, "-t", "acme", *simulated, "m"), "user_id has at most 200 characters")
    refused(run("byollm", "set", "-u", "u", "-t", long, *simulated, "m"), "tenant_id has at most 200 characters")
    refused(run("byollm", "set", "-u", "u", "-t", "acme", *simulated, long), "model has at most 200 characters")
    url = "http://localhost:11434/" + "v" * 500
    byollm_url = run("byollm", "set", "-u", "u", "-t", "a", "--provider", "openai_compatible", "--model", "m",
                     "--base-url", url)  # fmt: skip
    refused(byollm_url, "base_url has at most 500 characters")
    refused(run("purpose", "set", long, *simulated, "m"), "purpose has at most 200 characters")
    refused(run("budget", "set", long, "--max-calls", "3"), "extension_id has at most 200 characters")
    refused(run("budget", "set", "ext", "--max-calls", "99999999999"), f"max_calls is at most {2**31 - 1}")
    refused(run("budget", "set", "ext", "--max-tokens", str(2**63)), f"max_tokens is at most {2**63 - 1}")
    with session_factory() as session:
        assert session.scalars(select(ByollmSettingsRow)).all() == []
        assert session.scalars(select(PurposeSettingsRow)).all() == []
    at_limits = run("budget", "set", "x" * 200, "--max-calls", str(2**31 - 1), "--max-tokens", str(2**63 - 1))
    assert at_limits.exit_code == 0, at_limits.output


def test_byollm_set_without_a_key_keeps_the_stored_one_as_the_api_does(run, session_factory) -> None:
    """openai_compatible without --api-key: the stored key stays (it was dropped, where the API keeps it); with
    another base_url it is refused (the key is never sent elsewhere); --api-key '' removes it."""
    url = "http://127.0.0.1:11434/v1"
    args = ("byollm", "set", "-u", "dan", "-t", "acme", "--provider", "openai_compatible", "--base-url", url)

    def stored() -> bytes | None:
        with session_factory() as session:
            row = session.get(ByollmSettingsRow, "dan")
            assert row is not None
            return row.api_key_ciphertext

    assert run(*args, "--model", "m1", "--api-key", "sk-local-0123456789abcd").exit_code == 0
    first = stored()
    assert first is not None
    kept = run(*args, "--model", "m2")
    assert kept.exit_code == 0, kept.output
    second = stored()  # the same key, encrypted again (Fernet: a new IV each time)
    assert second is not None and "sk-…abcd" in kept.output
    moved = run("byollm", "set", "-u", "dan", "-t", "acme", "--provider", "openai_compatible", "--model", "m3",
                "--base-url", "http://attacker.example/v1")  # fmt: skip
    refused(moved, "base_url changes: send api_key again")
    assert stored() == second
    removed = run(*args, "--model", "m4", "--api-key", "")
    assert removed.exit_code == 0, removed.output
    assert stored() is None


def test_byollm_show_of_a_key_the_current_keys_cannot_decrypt_is_shown_as_the_api_does(run, monkeypatch) -> None:
    """The key that encrypted it is gone from METERING_SECRET_KEYS: the settings are shown, with a key stored and no
    mask (the API's answer); it exited 1."""
    import json

    from cryptography.fernet import Fernet

    monkeypatch.setenv("METERING_SECRET_KEYS", Fernet.generate_key().decode())
    assert run("byollm", "set", "-u", "erin", "-t", "acme", "--provider", "openai", "--model", "gpt-4o-mini",
               "--api-key", "sk-proj-0123456789wxyz").exit_code == 0  # fmt: skip
    monkeypatch.setenv("METERING_SECRET_KEYS", Fernet.generate_key().decode())
    shown = run("byollm", "show", "-u", "erin")
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert (view["has_api_key"], view["api_key_mask"], view["model"]) == (True, None, "gpt-4o-mini")


def test_byollm_show_names_its_fields_as_the_api_does(run) -> None:
    """It printed the mask as `api_key` (as if it were the key; the audit snapshot's `***` under that name too); the
    API's `GET /v1/admin/users/{tenant}/{user}/byollm` answers `has_api_key` and `api_key_mask`, never `api_key`."""
    import json

    from metering.api.admin_schemas import ByollmOut

    done = run("byollm", "set", "-u", "fay", "-t", "acme", "--provider", "openai", "--model", "gpt-4o-mini",
               "--api-key", "sk-proj-0123456789abcdwxyz")  # fmt: skip
    assert done.exit_code == 0, done.output
    shown = run("byollm", "show", "-u", "fay")
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert set(view) == set(ByollmOut.model_fields)
    assert (view["has_api_key"], view["api_key_mask"], view["tenant_id"]) == (True, "sk-…wxyz", "acme")
    assert "0123456789" not in shown.stdout


def test_a_provider_in_any_case_is_accepted_and_stored_lowercase_as_by_the_api(run, session_factory) -> None:
    """`--provider OpenAI` was refused (unknown provider), where METERING_PLATFORM__PROVIDER takes any case."""
    done = run("purpose", "set", "p", "--provider", "OpenAI", "--model", "gpt-4o")
    assert done.exit_code == 0, done.output
    # Simulated needs no key: not prompted for one (stdin is empty), as for `simulated`
    byollm = run("byollm", "set", "-u", "erin", "-t", "acme", "--provider", "Simulated", "--model", "m")
    assert byollm.exit_code == 0, byollm.output
    with session_factory() as session:
        assert session.get(PurposeSettingsRow, "p").provider == "openai"
        assert session.get(ByollmSettingsRow, "erin").provider == "simulated"
