"""GET /v1/usage: usage and money aggregated from the rollups (scope ``read``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from metering.api.deps import AppSettings, DbSession, Reader
from metering.api.problems import problem_responses
from metering.api.read_access import tenant_scope
from metering.api.read_schemas import UsageCounters, UsageResponse, UsageRow
from metering.api.validators import FilterText, UtcDatetime
from metering.billing import usage_queries
from metering.billing.usage_queries import GROUPS, UsageFilters

router = APIRouter(tags=["usage"])

_GROUP_HELP = (
    f"Dimensions to group by, comma-separated and/or repeated: {', '.join(GROUPS)}. `hour` is the UTC hour, "
    "`day` the UTC date. None: one row with the totals."
)


@router.get(
    "/usage",
    summary="Usage and money over a window, grouped",
    description=(
        "Requires the `read` scope. Sums of the rollups (never the raw events: per user and hour or day, or "
        "platform-wide per hour and per day when no tenant or user is involved) over `[from, to)`, both whole UTC "
        "hours (a time without offset is UTC), per combination of the `group_by` dimensions, filtered by equality on "
        "the other parameters (`provider` ignoring case). A token bound to a tenant sees only that tenant: `tenant_id` "
        "defaults to it, another tenant is `403`. Unknown `group_by` names, misaligned or empty windows are `422` "
        "(`invalid_input`); an answer of more rows than the service's limit (`METERING_API__MAX_USAGE_ROWS`, default "
        "50,000) is `422` (`too_many_rows`): narrow the window, the grouping or the filters; a parameter not listed "
        "here (`tenant=` for `tenant_id=`), or a filter given twice, is `422` (`validation_error`)."
    ),
    response_model=UsageResponse,
    responses=problem_responses(401, 403, 422, 503),
)
def get_usage(
    principal: Reader,
    session: DbSession,
    settings: AppSettings,
    start: Annotated[UtcDatetime, Query(alias="from", description="Window start (inclusive), a whole UTC hour.")],
    end: Annotated[UtcDatetime, Query(alias="to", description="Window end (exclusive), a whole UTC hour.")],
    group_by: Annotated[list[str], Query(description=_GROUP_HELP)] = [],  # noqa: B006 (FastAPI copies it)
    tenant_id: FilterText = None,
    user_id: FilterText = None,
    extension_id: FilterText = None,
    function: FilterText = None,
    purpose: FilterText = None,
    provider: FilterText = None,
    model: FilterText = None,
    byollm: bool | None = None,
    status: Literal["ok", "error", "cancelled"] | None = None,
) -> Response:
    filters = UsageFilters(
        tenant_id=tenant_scope(principal, tenant_id),
        user_id=user_id,
        extension_id=extension_id,
        function=function,
        purpose=purpose,
        provider=provider,
        model=model,
        byollm=byollm,
        status=status,
    )
    names = usage_queries.parse_group_by(group_by)
    start, end = usage_queries.check_window(start, end)
    groups = usage_queries.usage(session, start, end, names, filters, max_rows=settings.api.max_usage_rows)
    body = UsageResponse.model_validate(
        {
            "from": start,
            "to": end,
            "group_by": list(names),
            "rows": [UsageRow.of_group(g) for g in groups],
            "totals": UsageCounters.of(usage_queries.total(groups)),
        }
    )
    # Serialized here, once: FastAPI would validate the model again and encode it twice (~10 us per row).
    return Response(body.model_dump_json(by_alias=True), media_type="application/json")
