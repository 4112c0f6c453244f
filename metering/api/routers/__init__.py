"""The API's routers and where they are mounted. A new router module adds its line to ``ROUTES``."""

from __future__ import annotations

from fastapi import APIRouter

from metering.api.routers import events, health

ROUTES: list[tuple[APIRouter, str]] = [
    (health.router, ""),
    (events.router, "/v1"),
]
