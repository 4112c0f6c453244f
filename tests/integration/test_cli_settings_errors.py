"""Settings an operator got wrong are one error line from every command, at once (real CLI, subprocess): never a
traceback, never a value accepted that fails each call (or each delivery) later."""

from __future__ import annotations

import pytest

from tests.integration.test_cli import bare_env, metering, one_error_line

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # A JSON setting that is not JSON: pydantic-settings' SettingsError, not a ValidationError, was a traceback.
        # It is named (it was "METERING_PLATFORM__…"), and not a sibling that is no JSON setting.
        (
            {"METERING_PLATFORM__KEYED_BASE_URLS": "https://gw.internal/v1", "METERING_PLATFORM__MODEL": "gw.internal"},
            "invalid settings: METERING_PLATFORM__KEYED_BASE_URLS: a value that must be JSON",
        ),
        # Accepted, then every call to the platform LLM failed with `config_error` (a 500 from each invoke using it).
        ({"METERING_PLATFORM__PROVIDER": "gw.internal"}, "METERING_PLATFORM__PROVIDER: "),
        # Accepted, then every platform call failed as 'could not connect' (and every BYOLLM failover with it).
        ({"METERING_PLATFORM__BASE_URL": "api.example.com/v1"}, "METERING_PLATFORM__BASE_URL: "),
        ({"METERING_PLATFORM__KEYED_BASE_URLS": '["gw.internal/v1"]'}, "METERING_PLATFORM__KEYED_BASE_URLS: "),
        # Accepted, then every delivery failed, retried forever: the usage never reached the service.
        (
            {
                "METERING_SPOOL__SINK": "http",
                "METERING_SPOOL__HTTP_URL": "metering:8000",
                "METERING_SPOOL__HTTP_TOKEN": "mtr_unused",
            },
            "METERING_SPOOL__HTTP_URL: ",
        ),
        # /v1/events appended after a query or fragment: every batch a 404, retried forever.
        *(
            (
                {
                    "METERING_SPOOL__SINK": "http",
                    "METERING_SPOOL__HTTP_URL": url,
                    "METERING_SPOOL__HTTP_TOKEN": "mtr_unused",
                },
                "METERING_SPOOL__HTTP_URL: ",
            )
            for url in ("http://127.0.0.1:9/?via=gw", "http://127.0.0.1:9/#", "http://127.0.0.1:9?")
        ),
        # The endpoint instead of the base URL: batches went to /v1/events/v1/events, each a 404 retried forever.
        *(
            (
                {
                    "METERING_SPOOL__SINK": "http",
                    "METERING_SPOOL__HTTP_URL": url,
                    "METERING_SPOOL__HTTP_TOKEN": "mtr_unused",
                },
                "METERING_SPOOL__HTTP_URL: must be the service's base URL: /v1/events is appended to it",
            )
            for url in ("http://127.0.0.1:9/v1/events", "http://127.0.0.1:9/metering/v1/events/")
        ),
        # The API's prefix, as an OpenAI-style base URL is written (`…/v1`): batches went to /v1/v1/events, each a 404
        # retried forever.
        *(
            (
                {
                    "METERING_SPOOL__SINK": "http",
                    "METERING_SPOOL__HTTP_URL": url,
                    "METERING_SPOOL__HTTP_TOKEN": "mtr_unused",
                },
                "METERING_SPOOL__HTTP_URL: must be the service's base URL: /v1/events is appended to it",
            )
            for url in ("http://127.0.0.1:9/v1", "http://127.0.0.1:9/metering/v1/")
        ),
        # The token as an Authorization header holds it: every batch a 401, retried forever, "the sink is unreachable".
        (
            {
                "METERING_SPOOL__SINK": "http",
                "METERING_SPOOL__HTTP_URL": "http://127.0.0.1:9",
                "METERING_SPOOL__HTTP_TOKEN": "Bearer mtr_gw.internal",
            },
            "METERING_SPOOL__HTTP_TOKEN: ",
        ),
        # Set but empty (`METERING_DATABASE_URL=$DB_URL` with DB_URL unset): silently the local SQLite file instead.
        ({"METERING_DATABASE_URL": ""}, "METERING_DATABASE_URL: "),
        # Migrated a database gone with its connection ('at head'), then every command: 'no such table'.
        ({"METERING_DATABASE_URL": "sqlite://"}, "METERING_DATABASE_URL: an in-memory SQLite"),
        ({"METERING_DATABASE_URL": "sqlite+pysqlite:///:memory:"}, "METERING_DATABASE_URL: an in-memory SQLite"),
    ],
)
def test_a_malformed_setting_is_one_error_line_naming_it(tmp_path, settings, expected) -> None:
    for command in (["usage"], ["migrate"]):
        error = one_error_line(metering(command, bare_env(tmp_path, **settings)))
        assert error.startswith("error: invalid settings: ") and expected in error, error
        assert "gw.internal" not in error and "example.com" not in error  # names, never values
