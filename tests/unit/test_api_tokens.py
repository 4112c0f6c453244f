"""Token formats, digests and scopes (pure), and the tenant split of a batch (pure)."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from metering.api.tenancy import split_foreign
from metering.auth.tokens import (
    TENANT_MISMATCH,
    Scope,
    TokenPrincipal,
    digest,
    digests_equal,
    display_prefix,
    new_secret,
    parse_scopes,
    prefix_of,
    well_formed,
)
from metering.errors import InvalidInputError


def test_secrets_are_random_prefixed_and_hashed_with_sha256() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("mtr_") and len(a) == 47 and well_formed(a)
    assert digest(a) == hashlib.sha256(a.encode()).hexdigest() and len(digest(a)) == 64
    assert prefix_of(a) == a[:8] and display_prefix(prefix_of(a)) == a[:8] + "…"
    assert digests_equal(digest(a), digest(a)) and not digests_equal(digest(a), digest(b))


@pytest.mark.parametrize("value", ["", "mtr_", "mtr_abcd", "sk-ant-123456789", "mtr_" + "x" * 300])
def test_malformed_secrets_are_refused_before_any_lookup(value: str) -> None:
    assert not well_formed(value)


def test_scopes_are_known_deduplicated_and_required() -> None:
    assert parse_scopes(["read", "ingest", Scope.READ]) == (Scope.INGEST, Scope.READ)
    with pytest.raises(InvalidInputError, match="unknown scope 'root'"):
        parse_scopes(["ingest", "root"])
    with pytest.raises(InvalidInputError, match="at least one scope"):
        parse_scopes([])


def test_scopes_are_independent_and_tenant_binding_restricts() -> None:
    admin = TokenPrincipal(uuid.uuid4(), "ops", frozenset({Scope.ADMIN}))
    assert admin.allows(Scope.ADMIN) and not admin.allows(Scope.INGEST) and admin.may_act_for("any")
    bound = TokenPrincipal(uuid.uuid4(), "t1", frozenset({Scope.INGEST}), tenant_id="t1")
    assert bound.may_act_for("t1") and not bound.may_act_for("t2")


def test_split_foreign_keeps_positions_and_leaves_malformed_items_to_ingest() -> None:
    items = [{"tenant_id": "t1"}, {"tenant_id": "t2", "event_id": "e2"}, 7, {"user_id": "u"}, {"tenant_id": "t2"}]
    kept, positions, foreign = split_foreign(items, "t1")
    assert kept == [items[0], 7, {"user_id": "u"}] and positions == [0, 2, 3]
    assert [(r.index, r.event_id, r.reason) for r in foreign] == [
        (1, "e2", TENANT_MISMATCH),
        (4, None, TENANT_MISMATCH),
    ]
    assert split_foreign(items, None) == (items, [0, 1, 2, 3, 4], [])
