"""Turning spool lines into events, and dead-lettering those that are not events (with a reason)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from metering.events import UsageEvent, event_from_record, utcnow


@dataclass(frozen=True, slots=True)
class Rejected:
    offset: int
    line: bytes
    reason: str
    event_id: str | None = None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or "event"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def decode_line(line: bytes) -> UsageEvent | str:
    """The event on this line, or the reason it is not one."""
    try:
        record: Any = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    if not isinstance(record, dict):
        return f"not a JSON object: {type(record).__name__}"
    try:
        return event_from_record(record)
    except ValidationError as exc:
        return describe_validation_error(exc)


def decode_lines(
    lines: list[tuple[int, bytes]],
) -> tuple[list[UsageEvent], list[tuple[int, bytes]], list[Rejected]]:
    """The events, the (offset, line) each came from, and the lines that are not events."""
    events: list[UsageEvent] = []
    sources: list[tuple[int, bytes]] = []
    rejected: list[Rejected] = []
    for offset, line in lines:
        result = decode_line(line)
        if isinstance(result, str):
            rejected.append(Rejected(offset, line, result, _event_id_of(line)))
        else:
            events.append(result)
            sources.append((offset, line))
    return events, sources, rejected


def _event_id_of(line: bytes) -> str | None:
    try:
        value = orjson.loads(line).get("event_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class DeadLetters:
    """``rejected.jsonl``: one JSON record per rejected line, appended with one write each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, slot: str, segment: int, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        now = utcnow().isoformat()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for item in rejected:
                record = {
                    "rejected_at": now,
                    "slot": slot,
                    "segment": segment,
                    "offset": item.offset,
                    "event_id": item.event_id,
                    "reason": item.reason,
                    "line": item.line.decode("utf-8", errors="replace"),
                }
                os.write(fd, orjson.dumps(record) + b"\n")
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return [orjson.loads(line) for line in data.splitlines() if line.strip()]
