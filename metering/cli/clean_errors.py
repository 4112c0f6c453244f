"""The root command group: what no command can handle itself is reported as one ``error:`` line, never a traceback.

- Settings that do not validate (``METERING_ENV=prod`` without ``METERING_SECRET_KEYS``, a markup with 10 decimals,
  ``METERING_SPOOL__FLUSHER=bogus``): every failing setting by its variable name, never its value.
- A database the command cannot use (unreachable, refused, a URL nothing can connect to): the URL without its
  password, and the driver's reason.
- Any other MeteringError that reached the top (e.g. a ConfigError from ``metering migrate``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError
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


def json_setting_problem(exc: SettingsError, environ: Mapping[str, str] = os.environ) -> str:
    """``METERING_PLATFORM__KEYED_BASE_URLS: … not valid JSON`` from pydantic-settings' ``error parsing value for field
    "platform" from source "EnvSettingsSource"``: the variables of that field that must be JSON and are not (a
    nested setting's value must be JSON; the value is never shown)."""
    message = str(exc)
    field = message.split('"')[1] if message.count('"') >= 2 else ""
    names = sorted(name for name in _json_variables(field) if not _is_json(_get(environ, name)))
    name = ", ".join(names) or (f"METERING_{field.upper()}__…" if field else "a METERING_ variable")
    return f'{name}: a value that must be JSON (a list such as ["https://…"], an object) is not valid JSON'


def _json_variables(field: str) -> list[str]:
    """The variables of the settings field ``field`` that pydantic-settings reads as JSON: the field itself when it
    is a model or a collection, and its own such fields (``METERING_PLATFORM__KEYED_BASE_URLS``)."""
    info = Settings.model_fields.get(field)
    if info is None or not _is_complex(info.annotation):
        return []
    prefix = f"METERING_{field.upper()}"
    nested = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) else None
    inner = [] if nested is None else [sub for sub, i in nested.model_fields.items() if _is_complex(i.annotation)]
    return [prefix, *(f"{prefix}__{sub.upper()}" for sub in inner)]


def _is_complex(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return get_origin(annotation) in (list, set, frozenset, tuple, dict) or annotation in (list, set, frozenset, dict)


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """``name``'s value, in any case (settings are not case-sensitive)."""
    return next((value for key, value in environ.items() if key.upper() == name), None)


def _is_json(value: str | None) -> bool:
    if value is None:
        return True  # not set: not the culprit
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


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
