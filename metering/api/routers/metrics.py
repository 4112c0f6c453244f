"""GET /metrics: the Prometheus exposition (``metering.metrics``). Public unless ``METERING_API__METRICS_PUBLIC=false``,
which requires a token of scope ``read`` bound to no tenant. Not in the OpenAPI document: it is not a JSON API."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param

from metering.api.deps import app_settings, authorize
from metering.auth import Scope
from metering.errors import PermissionDeniedError
from metering.metrics import metrics_for

router = APIRouter(tags=["metrics"])


def _credentials(request: Request) -> HTTPAuthorizationCredentials | None:
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    if scheme.lower() != "bearer" or not token:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


@router.get("/metrics", include_in_schema=False)
def get_metrics(request: Request) -> Response:
    if not app_settings(request).api.metrics_public:
        principal = authorize(request, _credentials(request), Scope.READ)
        if principal.tenant_id is not None:  # platform-wide totals: less its own usage, another tenant's
            raise PermissionDeniedError("/metrics holds every tenant's usage: it needs a token bound to no tenant")
    body, content_type = metrics_for(request.app.state).render(request.headers.get("Accept"))
    return Response(content=body, media_type=content_type)
