"""The API's routers and where they are mounted. A new router module adds its line to ``ROUTES``."""

from __future__ import annotations

from fastapi import APIRouter

from metering.api.routers import admin_billing, admin_settings, audit, events, health, invoke, ledger, metrics, usage

ROUTES: list[tuple[APIRouter, str]] = [
    (health.router, ""),
    (events.router, "/v1"),
    (metrics.router, ""),
    (admin_settings.router, "/v1"),
    (admin_billing.router, "/v1"),
    (audit.router, "/v1"),
    (invoke.router, "/v1"),
    (usage.router, "/v1"),
    (ledger.router, "/v1"),
]
