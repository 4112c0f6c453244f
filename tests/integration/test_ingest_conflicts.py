"""An event id sent again with other content is rejected with the fields that differ; a true replay is a duplicate.

On SQLite and PostgreSQL: the stored event stands (nothing re-priced, nothing posted), and the rejection says why.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from metering.billing.checks import run_checks
from metering.billing.conflicts import CONTENT_FIELDS
from metering.db.models import UsageEventRow
from metering.events import event_from_record, uuid7
from tests.integration.test_ingest import NOW, event, ledger_state, row, run, transfers

# One valid change per content field (schema_version has one valid value today: it cannot differ yet).
CHANGES: dict[str, dict[str, Any]] = {
    "occurred_at": {"occurred_at": NOW - timedelta(minutes=6)},
    "tenant_id": {"tenant_id": "tenant-2"},
    "user_id": {"user_id": "user-2"},
    "extension_id": {"extension_id": "chatty"},
    "function": {"function": "summarize_thread"},
    "action_type": {"action_type": "write"},
    "invocation_id": {"invocation_id": str(uuid7())},
    "call_index": {"call_index": 3},
    "purpose": {"purpose": "thread_summary"},
    "provider": {"provider": "openai"},
    "model": {"model": "claude-haiku-4-5"},
    "is_byollm": {"is_byollm": True},
    "is_failover": {"is_failover": True},
    "is_stream": {"is_stream": True},
    "input_tokens": {"input_tokens": 121},
    "output_tokens": {"output_tokens": 41},
    "cache_read_tokens": {"cache_read_tokens": 21},
    "cache_write_tokens": {"cache_write_tokens": 1},
    "cache_write_1h_tokens": {"cache_write_tokens": 1, "cache_write_1h_tokens": 1},
    "reasoning_tokens": {"reasoning_tokens": 1},
    "web_searches": {"web_searches": 2},
    "usage_completeness": {"usage_completeness": "estimated"},
    "max_tokens": {"max_tokens": 1501},
    "stop_reason": {"stop_reason": "max_tokens"},
    "latency_ms": {"latency_ms": 12.6},
    "time_to_first_token_ms": {"time_to_first_token_ms": 3.0},
    "status": {"status": "cancelled"},
    "error_type": {"error_type": "Timeout"},
    "prompt_fingerprint": {"prompt_fingerprint": "e" * 32},
    "budget_exceeded": {"budget_exceeded": ["calls"]},
}


def test_every_content_field_is_compared() -> None:
    assert set(CHANGES) == set(CONTENT_FIELDS) - {"schema_version"}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_stored_id_with_one_field_changed_is_rejected_and_the_stored_event_stands(session_factory, field) -> None:
    stored = event(0)
    assert run(session_factory, [stored]).inserted == 1
    before = ledger_state(session_factory)
    same = {
        "event_id": str(stored.event_id),
        "invocation_id": str(stored.invocation_id),
        "occurred_at": stored.occurred_at,
    }
    changed = event_from_record(stored.model_dump(mode="json") | same | CHANGES[field])
    other = event(1)
    result = run(session_factory, [other, changed])
    assert (result.inserted, result.duplicates) == (1, 0)
    assert (run(session_factory, [stored]).duplicates, run(session_factory, [stored]).rejected) == (1, [])
    [rejection] = result.rejected
    assert (rejection.index, rejection.event_id) == (1, str(stored.event_id))
    if field == "tenant_id":  # another tenant's event: nothing of it is described
        assert (
            rejection.reason
            == "event_id is already used by another stored event: not ingested (the stored event stands)"
        )
    else:
        fields = ", ".join(name for name in CONTENT_FIELDS if name in CHANGES[field])  # 1-hour writes need writes
        assert rejection.reason == (
            f"event_id is already stored with different content ({fields}): not ingested (the stored event stands)"
        )
    kept = row(session_factory, stored)
    assert (kept.input_tokens, kept.user_id, kept.tenant_id, kept.latency_ms) == (120, "user-1", "tenant-1", 12.5)
    posted = ledger_state(session_factory)[1]  # only `other` was posted; the stored event's transfers are as they were
    assert posted - before[1] == {(t.id, t.kind, t.amount_nanos) for t in transfers(session_factory, other)}
    assert before[1] <= posted
    with session_factory() as session:
        assert run_checks(session).ok


def test_a_stored_id_replayed_with_the_same_content_is_a_duplicate_whatever_the_spelling_or_flag_order(
    session_factory,
) -> None:
    stored = event(0, budget_exceeded=["calls", "tokens"])
    assert run(session_factory, [stored]).inserted == 1
    with session_factory() as session:  # a row stored before provider names were lowercased
        session.execute(
            update(UsageEventRow).where(UsageEventRow.event_id == stored.event_id).values(provider="Anthropic")
        )
        session.commit()
    before = ledger_state(session_factory)
    reordered = stored.model_copy(update={"budget_exceeded": list(reversed(stored.budget_exceeded))})
    result = run(session_factory, [stored, reordered.model_dump(mode="json")])
    # The second item repeats the first within the batch (same content, flags in another order): a duplicate too.
    assert (result.inserted, result.duplicates, result.rejected) == (0, 2, [])
    assert ledger_state(session_factory) == before


def test_a_repeat_within_a_batch_with_other_content_is_rejected_and_the_first_is_ingested(session_factory) -> None:
    first = event(0)
    other = first.model_copy(update={"output_tokens": 400})
    result = run(session_factory, [first, other, first])
    assert (result.inserted, result.duplicates) == (1, 1)
    [rejection] = result.rejected
    assert rejection.index == 1
    assert rejection.reason == "repeats the event_id of item 0 with different content (output_tokens): not ingested"
    assert row(session_factory, first).output_tokens == 40


def test_the_repeats_of_a_conflicting_event_are_rejected_with_it(session_factory) -> None:
    stored = event(0)
    assert run(session_factory, [stored]).inserted == 1
    changed = stored.model_copy(update={"input_tokens": 999})
    result = run(session_factory, [changed, event(1), changed])
    assert (result.inserted, result.duplicates) == (1, 0)
    assert [r.index for r in result.rejected] == [0, 2]
    assert result.rejected[0].reason.startswith("event_id is already stored with different content (input_tokens)")
    assert result.rejected[1].reason.startswith("repeats the event_id of item 0, which is rejected: event_id is")


def test_a_later_item_that_is_the_stored_event_is_a_duplicate_when_the_first_item_with_its_id_differs(
    session_factory,
) -> None:
    """[changed, stored, changed, stored] with ``stored`` in the database: the changed items are rejected (they
    differ from the stored event); the items that equal it are replays, counted as duplicates, not rejected for
    differing from the changed item before them."""
    stored = event(0)
    assert run(session_factory, [stored]).inserted == 1
    before = ledger_state(session_factory)
    changed = stored.model_copy(update={"input_tokens": 999})
    result = run(session_factory, [changed, stored, changed, stored.model_dump(mode="json"), event(1)])
    assert (result.inserted, result.duplicates) == (1, 2)
    assert [r.index for r in result.rejected] == [0, 2]
    assert result.rejected[0].reason.startswith("event_id is already stored with different content (input_tokens)")
    assert result.rejected[1].reason.startswith("repeats the event_id of item 0, which is rejected")
    assert row(session_factory, stored).input_tokens == stored.input_tokens
    after = ledger_state(session_factory)
    assert after != before  # event(1) was posted; the stored event was not touched
    with session_factory() as session:
        assert run_checks(session).problems == []


def test_a_variant_of_a_new_event_stays_rejected(session_factory) -> None:
    """Nothing stored under the id: the first item is ingested, a later item with other content is rejected."""
    first = event(0)
    result = run(session_factory, [first, first.model_copy(update={"output_tokens": 400})])
    assert (result.inserted, result.duplicates, [r.index for r in result.rejected]) == (1, 0, [1])
