"""Adding a price override is safe to retry: the `Idempotency-Key` header (CLI: `--idempotency-key`), or an `id`
sent again, answers the first override instead of adding a second one (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from metering.auth import Scope
from metering.billing import overrides
from metering.db.models import PriceOverrideRow
from tests.integration.api.admin_helpers import audit_rows, offline_settings
from tests.integration.api.conftest import assert_problem, bearer

URL = "/v1/admin/price-overrides"
BODY = {"provider": "anthropic", "model_pattern": "claude-sonnet-*", "effective_from": "2026-01-01T00:00:00Z",
        "input_mtok": "3.00", "output_mtok": "15.00", "note": "negotiated"}  # fmt: skip


@pytest.fixture
def settings(db_url, tmp_path):
    return offline_settings(db_url, tmp_path)


@pytest.fixture
def admin(make_token):
    return bearer(make_token(Scope.ADMIN, name="ops-admin"))


def stored(session_factory) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(PriceOverrideRow)) or 0


def post(client, admin, body, key: str | bytes | None = None):
    headers = [*admin.items()] + ([("Idempotency-Key", key)] if key is not None else [])
    return client.post(URL, json=body, headers=headers)


def test_an_override_posted_twice_with_one_idempotency_key_is_added_once(client, admin, session_factory):
    """The same POST without an id sent again (a retry after a timeout) answered 201 twice and stored two overrides: a
    client that later ended "its" override left the duplicate pricing. With the same `Idempotency-Key`, the second
    answers the first override (200, `Idempotent-Replayed: true`) and adds and audits nothing."""
    first = post(client, admin, BODY, "retry-1")
    assert first.status_code == 201, first.text
    assert first.headers["Idempotent-Replayed"] == "false"
    again = post(client, admin, BODY | {"note": "a reworded retry"}, "retry-1")
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()  # the first override, its note too
    assert stored(session_factory) == 1
    (entry,) = audit_rows(session_factory)
    assert (entry.action, entry.after["id"]) == ("price_override.add", first.json()["id"])

    other = post(client, admin, BODY | {"input_mtok": "4.00"}, "retry-1")
    detail = assert_problem(other, 409, "idempotency_conflict")["detail"]
    assert first.json()["id"] in detail and "'retry-1'" in detail and "input_mtok" in detail
    another = post(client, admin, BODY, "retry-2")  # another key: another override
    assert another.status_code == 201 and another.json()["id"] != first.json()["id"]
    assert stored(session_factory) == 2 and len(audit_rows(session_factory)) == 2


def test_an_override_id_sent_again_answers_the_first_or_409_naming_what_differs(client, admin, session_factory):
    """An `id` used again was 409 "already exists (end it, or use a new id)" even for the same request: a client
    retrying its own POST was told to use a new id, and so added a second override. The same request again now
    answers the first (200, `Idempotent-Replayed: true`, not audited); another one is 409 `conflict` naming the
    override stored under the id and what differs."""
    body = BODY | {"id": "ovr_sonnet"}
    first = post(client, admin, body)
    assert first.status_code == 201 and first.headers["Idempotent-Replayed"] == "false"
    alike = {"provider": "Anthropic", "input_mtok": "3", "effective_from": "2026-01-01T01:00:00+01:00"}  # as values
    same = post(client, admin, body | alike)
    assert same.status_code == 200 and same.headers["Idempotent-Replayed"] == "true"
    assert same.json() == first.json()
    for change in ({"output_mtok": "16"}, {"effective_to": "2027-01-01T00:00:00Z"}, {"markup_pct": "10"},
                   {"model_pattern": "claude-*"}):  # fmt: skip
        detail = assert_problem(post(client, admin, body | change), 409, "conflict")["detail"]
        assert "'ovr_sonnet'" in detail and next(iter(change)) in detail, detail
    assert stored(session_factory) == 1 and len(audit_rows(session_factory)) == 1


def test_an_ended_override_is_not_answered_as_its_first_request(client, admin, session_factory):
    """Ended (or withdrawn) since, the override no longer is what the request asked for: a late retry is 409, naming
    its end, and adds nothing (it never reopens it)."""
    first = post(client, admin, BODY, "k1")
    ended = client.post(f"{URL}/{first.json()['id']}:withdraw", headers=admin)
    assert ended.status_code == 200, ended.text
    detail = assert_problem(post(client, admin, BODY, "k1"), 409, "idempotency_conflict")["detail"]
    assert "effective_to" in detail and "2026-01-01T00:00:00" in detail
    assert stored(session_factory) == 1


def test_an_override_key_is_checked_as_a_credit_key(client, admin, session_factory):
    """Printable ASCII, at most 200 characters (as a credit's); with an `id` too it is refused: the id already makes
    the request safe to retry, and a key beside it could not be kept."""
    not_ascii = post(client, admin, BODY, "clé".encode())
    assert "printable ASCII" in assert_problem(not_ascii, 422, "invalid_input")["detail"]
    assert_problem(post(client, admin, BODY, "k" * 201), 422, "invalid_input")
    both = post(client, admin, BODY | {"id": "ovr_x"}, "k1")
    assert "not both" in assert_problem(both, 422, "invalid_input")["detail"]
    assert post(client, admin, BODY, "   ").status_code == 201  # a blank header: no key, as before
    assert stored(session_factory) == 1


def test_the_cli_and_the_api_share_an_override_key(client, admin, run, session_factory):
    """`metering billing overrides add --idempotency-key K` run again answers the first override (`replayed`), even
    without `--from` (which is then the first run's start); the API's header with the same key finds the same one."""
    args = ["billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.10",
            "--output", "0.40", "--idempotency-key", "cli-1"]  # fmt: skip
    first = run(*args)
    assert first.exit_code == 0, first.output
    again = run(*args)
    assert again.exit_code == 0, again.output
    one, two = json.loads(first.output), json.loads(again.output)
    assert (one["replayed"], two["replayed"]) == (False, True)
    assert {k: v for k, v in two.items() if k != "replayed"} == {k: v for k, v in one.items() if k != "replayed"}
    body = {"provider": "ollama", "model_pattern": "llama3*", "effective_from": one["effective_from"],
            "input_mtok": "0.1", "output_mtok": "0.4"}  # fmt: skip
    api = post(client, admin, body, "cli-1")
    assert api.status_code == 200 and api.json()["id"] == one["id"]
    refused = run(*args[:-2], "--idempotency-key", "cli-1", "--input", "0.20")
    assert refused.exit_code != 0 and "cli-1" in refused.output
    assert stored(session_factory) == 1
    assert [e.action for e in audit_rows(session_factory)] == ["price_override.add"]


def test_a_retry_without_a_start_after_the_window_ended_answers_the_first_override(session_factory):
    """Without a start (the CLI without `--from`) a retry takes the first run's start, but the window was checked
    against the retry's own "now" first: retried once its `--to` had passed, the same request was refused as invalid
    ("effective_to must be after effective_from") instead of answering the first override."""
    first_run = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    request = {"provider": "ollama", "model_pattern": "llama3*", "effective_from": None,
               "effective_to": first_run + timedelta(hours=1), "input_mtok": Decimal("0.10"),
               "output_mtok": Decimal("0.40"), "idempotency_key": "cli-window"}  # fmt: skip
    with session_factory() as session:
        first = overrides.add(session, **request, now=first_run)
        session.commit()
        assert not first.replayed and first.row.effective_from == first_run
    with session_factory() as session:
        again = overrides.add(session, **request, now=first_run + timedelta(hours=2))
        assert again.replayed and again.row.id == first.row.id
    assert stored(session_factory) == 1
