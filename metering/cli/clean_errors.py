"""The root command group: what no command can handle itself is reported as one ``error:`` line, never a traceback.

- Settings that do not validate (``METERING_ENV=prod`` without ``METERING_SECRET_KEYS``, a markup with 10 decimals,
  ``METERING_SPOOL__FLUSHER=bogus``): every failing setting by its variable name, never its value.
- A database the command cannot use (unreachable, refused, a URL nothing can connect to): the URL without its
  password, and the driver's reason.
- Any other MeteringError that reached the top (e.g. a ConfigError from ``metering migrate``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy.exc import InterfaceError, OperationalError
from typer.core import TyperGroup

from metering.cli.common import fail
from metering.config import Settings
from metering.db.engine import database_problem
from metering.errors import MeteringError


def settings_problem(exc: ValidationError) -> str:
    """``invalid settings: METERING_SPOOL__FLUSHER: Input should be 'thread' or 'external'; …`` (no values)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        loc = [str(part) for part in error["loc"]]
        if loc:
            name = loc[0] if loc[0].isupper() else "METERING_" + "__".join(loc).upper()  # an alias is a name
            message = f"{name}: {message}"
        problems.append(message)
    return "invalid settings: " + "; ".join(problems)


def json_setting_problem(exc: SettingsError) -> str:
    """``METERING_PLATFORM__…: not valid JSON …`` from pydantic-settings' ``error parsing value for field "platform"
    from source "EnvSettingsSource"`` (a nested setting's value must be JSON; the value is never shown)."""
    message = str(exc)
    field = message.split('"')[1] if message.count('"') >= 2 else ""
    name = f"METERING_{field.upper()}__…" if field else "a METERING_ variable"
    return f'{name}: a value that must be JSON (a list such as ["https://…"], an object) is not valid JSON'


class CleanErrorsGroup(TyperGroup):
    def invoke(self, ctx: Any) -> Any:  # typer's Context: its vendored click's in typer 0.2x, click's before
        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            if exc.title != Settings.__name__:
                raise
            raise fail(settings_problem(exc)) from None
        except SettingsError as exc:  # a setting that must be JSON (a list, an object) and is not: was a traceback
            raise fail(f"invalid settings: {json_setting_problem(exc)}") from None
        except (OperationalError, InterfaceError) as exc:
            raise fail(database_problem(Settings().resolved_database_url, exc)) from None
        except MeteringError as exc:
            raise fail(exc.message) from None
