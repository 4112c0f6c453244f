"""``metering spool``: inspect the local spool and deliver it to the database."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from metering.cli.common import api_time, console, fail
from metering.config import Settings
from metering.events import UsageEvent
from metering.spool.decode import DeadLetters, decode_line
from metering.spool.flusher import Flusher
from metering.spool.held import HELD_NAME, HeldEvents, due_at
from metering.spool.inspect import (
    check_deliverable,
    check_readable,
    delivery_marks,
    reader_alive,
    slot_states,
    undelivered,
)
from metering.spool.segments import DEAD_LETTER_NAME
from metering.spool.writer import Spool
from metering.wiring import open_drainer

# Bounded like the spool's own waits (config.SpoolSettings): a wait of inf or 1e300 s overflows the thread locks
# (OverflowError) when --follow stops, a traceback instead of the drain's result.
MAX_DRAIN_TIMEOUT_S = 3600.0


def _drain_timeout(value: float) -> float:
    if not 0 <= value <= MAX_DRAIN_TIMEOUT_S:  # NaN fails this too
        raise typer.BadParameter(f"seconds from 0 to {MAX_DRAIN_TIMEOUT_S:g}, not {value}")
    return value


spool_app = typer.Typer(help="The durable local spool between ctx.llm and the database.", no_args_is_help=True)


@spool_app.command()
def status() -> None:
    """Per slot: writer alive, segments, the acknowledged cursor and the events still pending; then the events held
    (in the future by this host's clock: delivered once it gets there)."""
    settings = Settings()
    check_readable(settings.spool_dir)
    table = Table(title=f"Spool at {settings.spool_dir}", title_justify="left")
    for column in ("slot", "writer", "segments", "cursor", "pending events"):
        table.add_column(column)
    try:
        states = slot_states(settings.spool_dir)
        rejected = DeadLetters(settings.spool_dir / DEAD_LETTER_NAME).read()
        held = HeldEvents(settings.spool_dir / HELD_NAME).read()
    except PermissionError as exc:  # a writer creates its files 0600: another user was shown a traceback
        raise fail(
            f"cannot read the spool at {settings.spool_dir}: {exc.strerror or exc} ({exc.filename}): its files are "
            "readable only by the user that wrote them; run the command as that user"
        ) from None
    for state in states:
        table.add_row(
            state.slot,
            "alive" if state.writer_alive else "none",
            str(state.segments),
            f"{state.cursor.segment}:{state.cursor.offset}",
            str(state.pending),
        )
    console.print(table)
    for record in held:  # in the future by this host's clock (it stepped back): delivered once it gets there
        event = decode_line(str(record.get("line", "")).encode("utf-8"))
        when = f"due {api_time(due_at(event))}" if isinstance(event, UsageEvent) else "not an event"
        console.print(f"held {record.get('event_id')}  {when}  {record.get('reason', '')}", highlight=False)
    console.print(f"pending={sum(s.pending for s in states)} rejected={len(rejected)} held={len(held)}")


@spool_app.command()
def drain(
    follow: Annotated[bool, typer.Option(help="Keep delivering until interrupted (SIGINT/SIGTERM).")] = False,
    timeout: Annotated[
        float,
        typer.Option(
            callback=_drain_timeout,
            help="Seconds to wait for delivery of what is spooled (with --follow: once stopped), 0 to 3600.",
        ),
    ] = 60.0,
) -> None:
    """Deliver every slot of the spool this process can lock, including live writers' slots in other processes."""
    settings = Settings()
    check_readable(settings.spool_dir)  # before the flusher, which would retry listing it until the timeout
    check_deliverable(settings.spool_dir)  # and would take no slot of a read-only one, waiting to the timeout
    flusher, engine = open_drainer(settings)
    try:
        if follow:
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            flusher.start()
            console.print(f"draining {flusher.root} (Ctrl-C to stop)")
            stop.wait()
        drained, elsewhere = _deliver(flusher, timeout)  # slots another flusher holds, with their undelivered
        stats = flusher.stats
        # The flusher let go of its slots when it stopped: what is left is counted on disk, as `spool status` does.
        pending = sum(state.pending for state in slot_states(flusher.root))
        console.print(
            f"delivered={stats.delivered} duplicates={stats.duplicates} rejected={stats.rejected} "
            f"failures={stats.failures} pending={pending} drained={drained} held={stats.held}"
        )
        interval = settings.spool.flush_interval_s
        for slot, count in elsewhere.items():
            console.print(
                f"{slot.name}: {count} event(s) not delivered: another flusher holds the slot (a service's flusher "
                "thread, another `metering spool drain`) and has not delivered them yet; "
                + _why(slot, interval, timeout),
                highlight=False,
            )
        if not drained:
            raise typer.Exit(1)
    finally:
        if engine is not None:
            engine.dispose()


def _why(slot: Path, interval: float, timeout: float) -> str:
    """The likely cause when a live holder's flush interval (this process's setting, which a service next to it
    shares) is not shorter than the wait: it may not have reached its next flush. Else: its log says why."""
    if interval >= timeout and reader_alive(slot):
        return (
            f"its flush interval ({interval:g} s, METERING_SPOOL__FLUSH_INTERVAL_S) is not shorter than --timeout "
            f"{timeout:g}: it may not have flushed yet; wait longer, or run with a --timeout longer than the interval"
        )
    return "see its log"


def _deliver(flusher: Flusher, timeout: float) -> tuple[bool, dict[Path, int]]:
    """Deliver what is spooled now, up to ``timeout``: whether it was, and the slots another flusher holds whose
    cursor has not passed it, with their pending events. A slot another flusher holds (a service's flusher thread
    holds its own for good) cannot be taken: its cursor is waited for, and the slot delivered here if let go."""
    deadline = time.monotonic() + timeout
    marks = delivery_marks(flusher.root)
    drained = flusher.flush(timeout)
    held = undelivered(marks)
    while drained and held and time.monotonic() < deadline:
        time.sleep(0.05)
        drained = flusher.flush(max(0.0, deadline - time.monotonic()))  # takes a slot let go meanwhile
        held = undelivered(marks)
    flusher.stop(drain=False)
    return drained and not held, held if drained else {}


@spool_app.command()
def redrive(
    event_id: Annotated[list[str] | None, typer.Option("--event-id", help="Only this event (repeatable).")] = None,
    reason: Annotated[str | None, typer.Option(help="Only dead letters whose reason contains this text.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be redriven.")] = False,
) -> None:
    """Put dead-lettered events back into the spool, once what refused them is fixed: the flusher (or `metering
    spool drain`) delivers them again, idempotently. Lines that are not valid events (torn writes, events this
    version still refuses) stay dead-lettered."""
    settings = Settings()
    check_readable(settings.spool_dir)
    letters = DeadLetters(settings.spool_dir / DEAD_LETTER_NAME)
    wanted = {_event_key(ident): ident for ident in event_id or ()}

    def select(record: dict[str, Any]) -> bool:  # an event today: a line that is none would only come back
        ident = record.get("event_id")
        return (
            isinstance(ident, str)
            and (not wanted or _event_key(ident) in wanted)
            and (reason is None or reason in str(record.get("reason", "")))
            and isinstance(decode_line(str(record.get("line", "")).encode("utf-8")), UsageEvent)
        )

    if dry_run or not letters.path.exists():
        taken = [r for r in letters.read() if select(r)]
    else:
        with Spool(settings.spool_dir, segment_bytes=settings.spool.segment_bytes, fsync=True) as spool:
            taken = letters.redrive(select, spool.append)
    for record in taken:
        console.print(f"{record['event_id']}  {record.get('reason', '')}", highlight=False)
    if dry_run:
        console.print(f"would redrive {len(taken)} event(s)")
    else:
        console.print(f"redrove {len(taken)} event(s) into the spool; `metering spool drain` delivers them now")
    found = {_event_key(record["event_id"]) for record in taken}
    missing = [given for key, given in wanted.items() if key not in found]
    if missing:  # a typo'd id: an error, after the others were redriven all the same
        raise fail(
            f"--event-id {', '.join(missing)}: no dead-lettered event with this id that is a valid event today"
            + (f" and whose reason contains {reason!r}" if reason is not None else "")
            + " (see `metering spool status`)"
        )


def _event_key(ident: str) -> str:
    """An event id as redrive compares it: a UUID in any case or spelling as its canonical form."""
    try:
        return str(uuid.UUID(ident))
    except ValueError:
        return ident
