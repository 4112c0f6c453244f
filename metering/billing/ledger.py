"""The double-entry ledger's rules (pure): accounts, derived transfer ids, postings, balance deltas.

Every transfer debits one account and credits another by the same positive amount, so the balances
(credits minus debits) of all accounts always sum to zero. Transfer ids are derived from what caused
them (event id and kind, or an idempotency key), so posting the same thing twice is impossible.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

CURRENCY = "USD"
# accounts.balance_nanos is a BIGINT: about ±9.22 billion USD. A posting that would take a cached balance past
# it is refused whole (PostgreSQL would fail the statement, SQLite would silently turn the sum into a float).
MAX_BALANCE_NANOS = 2**63 - 1
NAMESPACE = uuid.UUID("9b1f3a52-5d0e-4c54-9a3e-2f7f1c2d8e61")

PLATFORM_REVENUE = "platform:revenue"
TOPUPS = "platform:topups"
ADJUSTMENTS = "platform:adjustments"


class TransferKind(StrEnum):
    USAGE_CHARGE = "usage_charge"  # user wallet -> platform revenue (price incl. markup)
    PROVIDER_COST = "provider_cost"  # provider cost (expense) -> provider payable
    CREDIT = "credit"  # top-ups -> user wallet (prepaid credit, promotions)
    ADJUSTMENT = "adjustment"  # manual correction, either direction
    REVERSAL = "reversal"  # the mirror of an earlier transfer (re-rate, correction)


class AccountKind(StrEnum):
    USER_WALLET = "user_wallet"
    PLATFORM_REVENUE = "platform_revenue"
    PROVIDER_COST = "provider_cost"
    PROVIDER_PAYABLE = "provider_payable"
    TOPUPS = "topups"
    ADJUSTMENTS = "adjustments"


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    kind: AccountKind
    tenant_id: str | None = None
    user_id: str | None = None


def wallet_id(tenant_id: str, user_id: str) -> str:
    """``user:<tenant>:<user>``, the tenant with ``~`` and ``:`` escaped (``~7E``, ``~3A``) so that no two
    (tenant, user) pairs share a wallet ('acme:x'/'y' and 'acme'/'x:y' once did). Ids of tenants without those
    characters are unchanged. PostgreSQL ingest builds the same id in SQL (``batch_sql.WALLET_ID_SQL``)."""
    return f"user:{tenant_id.replace('~', '~7E').replace(':', '~3A')}:{user_id}"


def unescaped_wallet_id(tenant_id: str, user_id: str) -> str:
    """The wallet id versions before ``wallet_id`` escaped the tenant gave (tenant, user): their charges keep it."""
    return f"user:{tenant_id}:{user_id}"


def user_wallet(tenant_id: str, user_id: str) -> Account:
    return Account(wallet_id(tenant_id, user_id), AccountKind.USER_WALLET, tenant_id, user_id)


def provider_cost(provider: str) -> Account:
    return Account(f"provider:{provider}:cost", AccountKind.PROVIDER_COST)


def provider_payable(provider: str) -> Account:
    return Account(f"provider:{provider}:payable", AccountKind.PROVIDER_PAYABLE)


REVENUE = Account(PLATFORM_REVENUE, AccountKind.PLATFORM_REVENUE)
TOPUP_SOURCE = Account(TOPUPS, AccountKind.TOPUPS)
ADJUSTMENT_SOURCE = Account(ADJUSTMENTS, AccountKind.ADJUSTMENTS)


_CHARGE_KIND, _USAGE_KINDS = TransferKind.USAGE_CHARGE.value, (TransferKind.USAGE_CHARGE, TransferKind.PROVIDER_COST)
_COST_VARIANT = dict(zip("89ab", "cdef", strict=True))  # variant bits 10 -> 11


def transfer_id(cause: str, kind: str) -> uuid.UUID:
    """The id of the transfer ``kind`` caused by ``cause`` (an event id, a key, a re-rate run...)."""
    return uuid.uuid5(NAMESPACE, f"{cause}/{kind}")


def usage_transfer_hex(event_hex: str, kind: str) -> str:
    """The id (32 hex) of the ``kind`` transfer of usage event ``event_hex`` (a UUIDv7): the event id
    re-stamped as a UUIDv8 (version nibble 8), with the kind in the variant bits: ``10`` for the usage
    charge, ``11`` for the provider cost. One id per (event, kind), no other transfer can have it (uuid5
    ids carry version 5), it is time-ordered like the event (a batch's transfers append to the index), and a
    replay cannot post twice. PostgreSQL ingest computes the same id in SQL (``metering.billing.batch_sql``);
    a test holds the two equal."""
    if event_hex[12] != "7" or event_hex[16] not in "89ab":
        raise ValueError(f"usage transfers derive from UUIDv7 event ids, not {event_hex}")
    if kind not in _USAGE_KINDS:
        raise ValueError(f"{kind!r} is not a usage transfer kind")
    variant = event_hex[16] if kind == _CHARGE_KIND else _COST_VARIANT[event_hex[16]]
    return f"{event_hex[:12]}8{event_hex[13:16]}{variant}{event_hex[17:]}"


def usage_transfer_id(event_id: uuid.UUID, kind: str) -> uuid.UUID:
    return uuid.UUID(hex=usage_transfer_hex(event_id.hex, kind))


@dataclass(frozen=True, slots=True)
class Posting:
    id: uuid.UUID
    debit: Account
    credit: Account
    amount_nanos: int
    kind: TransferKind
    event_id: uuid.UUID | None = None
    period: str | None = None
    reverses_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    memo: str | None = None

    def __post_init__(self) -> None:
        if self.amount_nanos <= 0:
            raise ValueError("a transfer moves a positive amount")
        if self.debit.id == self.credit.id:
            raise ValueError("a transfer needs two different accounts")


def usage_postings(
    *,
    event_id: uuid.UUID,
    tenant_id: str,
    user_id: str,
    provider: str,
    period: str,
    charge_nanos: int,
    cost_nanos: int,
) -> list[Posting]:
    """The charge to the user and the provider cost of one billable call (either may be zero)."""
    postings = []
    if charge_nanos > 0:
        postings.append(
            Posting(
                usage_transfer_id(event_id, TransferKind.USAGE_CHARGE),
                user_wallet(tenant_id, user_id),
                REVENUE,
                charge_nanos,
                TransferKind.USAGE_CHARGE,
                event_id,
                period,
            )
        )
    if cost_nanos > 0:
        postings.append(
            Posting(
                usage_transfer_id(event_id, TransferKind.PROVIDER_COST),
                provider_cost(provider),
                provider_payable(provider),
                cost_nanos,
                TransferKind.PROVIDER_COST,
                event_id,
                period,
            )
        )
    return postings


def reversal(original: Posting, cause: str, memo: str | None = None) -> Posting:
    """The mirror of ``original``: same amount, accounts swapped; its id derives from ``cause``."""
    return Posting(
        transfer_id(f"{cause}/{original.id}", TransferKind.REVERSAL),
        original.credit,
        original.debit,
        original.amount_nanos,
        TransferKind.REVERSAL,
        original.event_id,
        original.period,
        reverses_id=original.id,
        memo=memo,
    )


def balance_deltas(postings: Iterable[Posting]) -> dict[str, int]:
    """Per account: credits minus debits."""
    deltas: dict[str, int] = defaultdict(int)
    for posting in postings:
        deltas[posting.debit.id] -= posting.amount_nanos
        deltas[posting.credit.id] += posting.amount_nanos
    return dict(deltas)


def past_balance_limit(balances: Mapping[str, int], deltas: Mapping[str, int]) -> list[str]:
    """The accounts (sorted) whose balance, ``balances`` (0 when absent) plus its delta, would leave the
    range a stored balance can hold (``MAX_BALANCE_NANOS`` either way)."""
    return sorted(a for a, delta in deltas.items() if abs(balances.get(a, 0) + delta) > MAX_BALANCE_NANOS)


def accounts_of(postings: Iterable[Posting]) -> dict[str, Account]:
    found: dict[str, Account] = {}
    for posting in postings:
        found.setdefault(posting.debit.id, posting.debit)
        found.setdefault(posting.credit.id, posting.credit)
    return found
