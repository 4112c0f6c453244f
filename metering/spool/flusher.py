"""The flusher: a daemon thread that moves spooled events to a sink and records what it acknowledged.

Per batch: decode the lines, deliver the valid events, dead-letter the invalid ones with a reason (and hold
those refused as in the future that are ahead of this host's clock too: ``spool.held``, delivered by later passes),
then advance the slot's cursor. A failing sink is retried with exponential backoff, forever: nothing
is dropped (an error with a ``retry_after_s``, a service's ``Retry-After``, is retried no sooner, up to
``max_backoff_s``). A crash between delivery and the cursor write re-delivers the batch, and the idempotent
sink counts those events as duplicates.

A flusher drains every slot whose reader lock (``writer-N/reader.lock``) it can take: its own process's
slot, slots left by dead processes, and, when it runs as its own process (``metering spool drain``),
the slots of live writers in other processes. So the writer's process can leave the delivery work,
and its CPU, to another process entirely.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from metering.events import UsageEvent, utcnow
from metering.spool.decode import DISK_FULL, DeadLetters, Rejected, decode_lines
from metering.spool.held import HELD_NAME, HeldEvents, ahead_of, refused_as_early, to_hold, too_far_ahead_note
from metering.spool.inspect import writer_alive
from metering.spool.isolation import deliver_isolating
from metering.spool.reader import Batch, pending_lines, read_batch, remove_segment
from metering.spool.segments import (
    DEAD_LETTER_NAME,
    READER_LOCK_NAME,
    Cursor,
    list_segments,
    list_slots,
    read_cursor,
    segment_name,
    write_cursor,
)
from metering.spool.sink import RefusedBatchError, Sink
from metering.spool.writer import Spool, fork_guard, lock_free, try_lock

PROBE_BATCHES = 16  # how far past a refused batch the flusher looks for events to try
log = logging.getLogger("metering.spool")

# Batches taken from a slot whose writer is alive before moving on to the next slot (fairness).
LIVE_BATCHES_PER_PASS = 20
# Reader locks held at once (one file descriptor each); drained slots without a writer are released.
MAX_HELD_SLOTS = 256


@dataclass(frozen=True, slots=True)
class FlusherStats:
    delivered: int  # events the sink stored for the first time
    duplicates: int  # events the sink already had (a replay after a crash, or a repeated line)
    rejected: int  # lines dead-lettered to rejected.jsonl
    held: int  # events in held.jsonl: in the future by this host's clock, delivered once it gets there (spool.held)
    failures: int  # failed delivery attempts (each retried later)
    batches: int
    pending: int  # complete lines not yet acknowledged in this process's slot and the slots it drains
    slots: int  # slots this flusher drains
    last_error: str | None


class Flusher:
    """Moves spooled events to ``sink``. Give it the process's ``Spool``, or a spool directory to drain."""

    def __init__(
        self,
        spool: Spool | Path | str,
        sink: Sink,
        *,
        batch_size: int = 500,
        interval_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.spool = spool if isinstance(spool, Spool) else None
        self.root = spool.root if isinstance(spool, Spool) else Path(spool)
        self.sink = sink
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.dead_letters = DeadLetters(self.root / DEAD_LETTER_NAME)
        self.held_events = HeldEvents(self.root / HELD_NAME)
        self._held: dict[Path, int] = {}  # slot dir -> fd holding its reader lock
        # Batches the sink took, in all and per slot: another slot's are proof that it works, so that a batch it
        # keeps refusing is refused for its events' own sake.
        self._accepted = 0
        self._accepted_in: dict[Path, int] = {}
        self._pass_start_in: dict[Path, int] = {}  # self._accepted_in when the current pass began
        # slot -> (the pass in which its current batch was first refused, other slots' batches taken before it)
        self._refused: dict[Path, tuple[int, int]] = {}
        self._rotated_out: set[Path] = set()  # drained slots released to let left-out ones in: claimed last
        self._passes = 0
        self._pass_start = 0  # self._accepted when the current pass began
        # Held events the sink refused with no proof that it works (time.monotonic()): not tried again before, unless
        # a pass has that proof (the sink took a slot's batch in it).
        self._held_refused_until = 0.0
        self._pass_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._done = threading.Condition()
        self._requested = 0  # flush() generations asked for
        self._completed = 0  # newest generation for which a full pass finished after it was asked for
        self._thread: threading.Thread | None = None
        self._delivered = self._duplicates = self._rejected = self._failures = self._batches = 0
        self._last_error: str | None = None
        _FLUSHERS.add(self)

    def _after_fork_in_child(self) -> None:
        """The parent's thread does not run here, and its reader locks stay the parent's: the child's copies of their
        descriptors held them too, and its flush() drained the parent's slots alongside the parent's flusher. Locks
        another thread held at the fork would be held for ever here (a flush() that hangs): new ones."""
        for fd in self._held.values():
            os.close(fd)  # the parent's own descriptor keeps the slot locked
        self._held.clear()
        self._refused.clear()
        self._rotated_out.clear()
        self._pass_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._done = threading.Condition()
        self._thread = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Flusher:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="metering-spool-flusher", daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Deliver everything appended before this call. True when done, False on timeout (nothing is lost).

        Done means: this process's own appends are acknowledged (by this flusher, or by whichever
        flusher process drains the slot) and every other slot this flusher holds is drained.
        """
        deadline = time.monotonic() + timeout
        own = self._own_slot()
        target = self.spool.position() if own is not None and self.spool is not None else None
        with self._done:
            self._requested += 1
            generation = self._requested
        if self._thread is None or not self._thread.is_alive():
            if not self._flush_inline(generation, deadline):
                return False
        else:
            self._wake.set()
            with self._done:
                if not self._done.wait_for(lambda: self._completed >= generation, _left(deadline)):
                    return False
        while own is not None and target is not None and not _reached(read_cursor(own), target):
            if time.monotonic() >= deadline:
                return False
            if (self._thread is None or not self._thread.is_alive()) and self._could_claim(own):
                # The drainer let the slot go before its cursor passed these appends (it stopped): deliver them here.
                with self._done:
                    self._requested += 1
                    generation = self._requested
                if not self._flush_inline(generation, deadline):
                    return False
            time.sleep(0.01)  # another process's flusher holds this slot: wait for its cursor
        return True

    def _could_claim(self, slot: Path) -> bool:
        """Whether this flusher holds the slot's reader lock, or could take it now."""
        if slot in self._held:
            return True
        try:
            return lock_free(slot / READER_LOCK_NAME)
        except OSError:
            return False

    def stop(self, *, drain: bool = True, timeout: float = 30.0) -> bool:
        """Stop the thread; with ``drain``, first deliver what is spooled (up to ``timeout``)."""
        drained = self.flush(timeout) if drain else False
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout))
            self._thread = None
        with self._pass_lock, fork_guard():  # (see writer.fork_guard)
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()
        return drained

    @property
    def stats(self) -> FlusherStats:
        slots = set(self._held)
        own = self._own_slot()
        if own is not None:
            slots.add(own)
        pending = sum(pending_lines(slot, read_cursor(slot)) for slot in slots)
        return FlusherStats(
            delivered=self._delivered,
            duplicates=self._duplicates,
            rejected=self._rejected,
            held=len(self.held_events.read()),
            failures=self._failures,
            batches=self._batches,
            pending=pending,
            slots=len(self._held),
            last_error=self._last_error,
        )

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                busy = self._pass()
                backoff = 0.0
            except Exception as exc:  # the sink is down or slow: keep everything, retry later
                backoff = self._backoff_after(exc, backoff)
                self._record_failure(exc, backoff)
                self._wake.wait(backoff)
                self._wake.clear()
                continue
            if not busy:
                self._wake.wait(self.interval_s)
                self._wake.clear()

    def _flush_inline(self, generation: int, deadline: float) -> bool:
        backoff = 0.0
        while True:
            try:
                while self._pass(deadline):  # a backlog is delivered up to the deadline, never past it
                    if time.monotonic() >= deadline:
                        return False
                return self._completed >= generation
            except Exception as exc:
                backoff = self._backoff_after(exc, backoff)
                self._record_failure(exc, backoff)
                if time.monotonic() + backoff > deadline:
                    return False
                time.sleep(backoff)

    def _backoff_after(self, exc: Exception, backoff: float) -> float:
        """The wait before the next try: the previous one doubled (``interval_s`` at first), and at least what the
        sink was asked to wait (an HTTP service's ``Retry-After``: ``retry_after_s`` on the error); never more than
        ``max_backoff_s``, so a header asking for a day does not stall delivery for a day."""
        asked = getattr(exc, "retry_after_s", None) or 0.0
        return min(self.max_backoff_s, max(self.interval_s, backoff * 2, asked))

    def _record_failure(self, exc: Exception, backoff: float) -> None:
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._failures == 1 or self._failures % 20 == 0:
            log.warning("spool delivery failed (%d so far), retrying in %.1fs: %s", self._failures, backoff, exc)

    def _own_slot(self) -> Path | None:
        return self.spool.slot_dir if self.spool is not None else None

    def _pass(self, deadline: float | None = None) -> bool:
        """One round over every slot this flusher holds. True if a slot still has a backlog. With a ``deadline``
        (a flush without the thread), a slot's backlog is left for later once it is reached."""
        with self._pass_lock:
            with self._done:
                generation = self._requested
            left_out = self._claim_slots()
            self.dead_letters.keep_reserve()  # space for dead letters once the disk is full
            self._passes += 1
            self._pass_start = self._accepted
            self._pass_start_in = dict(self._accepted_in)
            busy = False
            failed: Exception | None = None
            for slot in list(self._held):
                if not slot.is_dir():  # removed by an operator once drained: let it go
                    self._release(slot)
                    continue
                try:  # one slot that cannot deliver never holds up the others
                    backlog = self._drain(slot, deadline)
                except Exception as exc:
                    failed = failed or exc
                    continue
                busy |= backlog
                if not backlog and slot != self._own_slot() and (left_out or self._idle(slot)):
                    # Drained: its lock (a file descriptor) goes back when nobody writes to it, or when slots with
                    # something to read were left out for want of locks (another pass takes them; this one waits).
                    self._release(slot)
                    if left_out:
                        self._rotated_out.add(slot)
                        busy = True
            try:  # not while a slot fails (the sink down, most likely): that failure is retried with backoff
                if failed is None:
                    self._deliver_held(deadline)
            except Exception as exc:
                failed = exc
            if failed is not None:
                raise failed  # retried with backoff; the pass is not complete
            with self._done:
                self._completed = max(self._completed, generation)
                self._done.notify_all()
            return busy

    def _idle(self, slot: Path) -> bool:
        """Nothing left to deliver and no live writer: the slot needs no reader until a writer takes it again."""
        return not list_segments(slot) and not writer_alive(slot)

    def _release(self, slot: Path) -> None:
        with fork_guard():  # (see writer.fork_guard)
            fd = self._held.pop(slot, None)
            if fd is not None:
                os.close(fd)  # releases the reader lock
        self._refused.pop(slot, None)

    def _claim_slots(self) -> bool:
        """Take the reader lock of every slot we can, up to ``MAX_HELD_SLOTS``; True if some were left out."""
        own = self._own_slot()
        slots = list_slots(self.root)
        if own is not None and own in slots:  # our own slot first
            slots.remove(own)
            slots.insert(0, own)
        # Slots released for want of locks go last: the others get their turn (no slot waits behind live writers).
        slots.sort(key=lambda slot: slot != own and slot in self._rotated_out)
        for slot in slots:
            if slot in self._held or (slot != own and not _has_unread(slot)):  # nothing to deliver there yet
                continue
            if len(self._held) >= MAX_HELD_SLOTS:  # the rest in later passes, as drained slots are released
                return True
            with contextlib.suppress(OSError), fork_guard():  # (see writer.fork_guard)
                fd = try_lock(slot / READER_LOCK_NAME)
                if fd is not None:
                    self._held[slot] = fd
        self._rotated_out.clear()  # every slot with something to read has had its turn
        return False

    def _live_segment(self, slot: Path, segments: list[int]) -> int | None:
        """The segment a live writer may still append to; None when nobody writes to the slot."""
        if self.spool is not None and slot == self.spool.slot_dir and not self.spool.closed:
            return self.spool.current_segment
        if writer_alive(slot):  # its newest segment may be in progress
            return segments[-1] if segments else None
        return None

    def _drain(self, slot: Path, deadline: float | None = None) -> bool:
        """Handle batches until the slot has nothing ready (or ``deadline``). True if it still has a backlog."""
        segments = list_segments(slot)  # listed before the liveness check, see read_batch
        live = self._live_segment(slot, segments)
        cursor = read_cursor(slot)
        for _ in range(LIVE_BATCHES_PER_PASS) if live is not None else iter(int, 1):
            if self._stopping.is_set():
                return False
            batch = read_batch(slot, cursor, current_segment=live, max_lines=self.batch_size, segments=segments)
            if batch is None:
                return False
            self._handle(slot, batch, live)
            cursor = batch.next_cursor
            if deadline is not None and time.monotonic() >= deadline:
                return True  # a dead writer's slot was read to its end otherwise: a flush ran past its timeout
        return True

    def _handle(self, slot: Path, batch: Batch, live: int | None) -> None:
        events, sources, rejected = decode_lines(batch.lines)
        held: list[tuple[UsageEvent, Rejected]] = []
        if batch.torn is not None:
            offset, fragment = batch.torn
            rejected.append(Rejected(offset, fragment, "torn write: incomplete line at the end of a finished segment"))
        if events:
            try:
                result = deliver_isolating(self.sink, events)  # raises → nothing below runs; the batch is retried
            except RefusedBatchError:
                # Every part refused: a broken sink, or only bad events here (a batch of one, the end of a
                # segment). The sink's other deliveries tell which: if it took other batches since this one was
                # first refused (any slot's), or takes the events behind it, these are refused for their own sake.
                # Refused in an earlier pass, and the sink took another slot's batch since that pass began (before or
                # after this one in the pass): the refusal is this batch's own.
                others_then = self._pass_start - self._pass_start_in.get(slot, 0)
                first_pass, others_before = self._refused.setdefault(slot, (self._passes, others_then))
                others_now = self._accepted - self._accepted_in.get(slot, 0)
                healthy = first_pass < self._passes and others_now > others_before
                if not healthy and not self._sink_takes_what_follows(slot, batch, live):
                    raise
                result = deliver_isolating(self.sink, events, sink_healthy=True)
            self._refused.pop(slot, None)
            self._took(slot)
            self._delivered += result.inserted
            self._duplicates += result.duplicates
            now = utcnow()
            for index, reason in result.rejected:  # refused by the sink (e.g. an event from the future)
                offset, line = sources[index]
                event = events[index]
                if to_hold(event, reason, now):  # this host's clock stepped back since the event was written
                    held.append((event, Rejected(offset, line, f"rejected by the sink: {reason}", str(event.event_id))))
                    continue
                note = too_far_ahead_note() if refused_as_early(reason) else ""
                rejected.append(Rejected(offset, line, f"rejected by the sink: {reason}{note}", str(event.event_id)))
        if held:  # before the cursor moves past them: a crash in between holds them twice (duplicates, no loss)
            try:
                self.held_events.write(slot.name, batch.segment, [item for _, item in held])
            except OSError as exc:  # a full disk: dead-lettered (into the space kept aside), never holding the slot up
                if exc.errno not in DISK_FULL:
                    raise
                log.warning("spool: no space to hold %d event(s) in the future; dead-lettered: %s", len(held), exc)
                note = " (not held: the disk was full)"
                rejected += [Rejected(i.offset, i.line, i.reason + note, i.event_id) for _, i in held]
            else:
                self._warn_held([event for event, _ in held], now)
        self.dead_letters.write(slot.name, batch.segment, rejected)
        self._rejected += len(rejected)
        self._batches += 1
        write_cursor(slot, batch.next_cursor)
        if batch.finished_segment:
            remove_segment(slot, batch.segment)

    def _warn_held(self, events: list[UsageEvent], now: datetime) -> None:
        shown = ", ".join(f"{event.event_id} ({ahead_of(event, now)} ahead)" for event in events[:5])
        more = f" and {len(events) - 5} more" if len(events) > 5 else ""
        log.warning(
            "spool: the sink refuses event(s) %s%s as in the future, and they are ahead of this host's clock too: the "
            "clock stepped back since they were written (an NTP step, a VM resumed?); held in %s and delivered once "
            "the clock gets there (see `metering spool status`)",
            shown,
            more,
            self.held_events.path,
        )

    def _deliver_held(self, deadline: float | None) -> None:
        """Deliver the held events that are due by this host's clock (``spool.held``), a batch at a time.

        Every part of a batch refused, and no slot's batch taken in this pass (nothing tells a sink that refuses all
        from events refused for their own sake): they stay held, counted delivered for now as those not due, and are
        tried again after ``max_backoff_s``, or in a pass that has the proof (then dead-lettered if refused still).
        They hold nothing up: raised, the pass failed, retried with backoff, so ``flush()`` and a fresh `metering
        spool drain` with nothing else to deliver never completed (exit 1) and nothing was dead-lettered either."""
        if self._accepted == self._pass_start and time.monotonic() < self._held_refused_until:
            return
        try:
            while self.held_events.deliver_due(utcnow(), self.batch_size, self._deliver_due) == self.batch_size:
                if self._stopping.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    return
        except RefusedBatchError as exc:  # raised only without the proof (see _deliver_due)
            self._held_refused_until = time.monotonic() + self.max_backoff_s
            log.warning(
                "spool: the sink refuses held events now due, and took nothing else to tell whether it refuses "
                "everything: kept held, tried again in %.1fs or once it takes a batch: %s",
                self.max_backoff_s,
                exc,
            )

    def _deliver_due(self, records: list[dict[str, Any]], events: list[UsageEvent]) -> set[int]:
        """Deliver held events; the positions of those to hold on (the sink still refuses them as in the future, by
        less than MAX_HELD_AHEAD); those it refuses otherwise are dead-lettered."""
        # The sink took a slot's batch in this pass (the slots go first): a refusal that remains after isolation is
        # the event's own. One it took once, since this flusher started, proves nothing now: a sink refusing every
        # batch (its own 500 to all, a schema the code does not match) dead-lettered held events as they fell due.
        result = deliver_isolating(self.sink, events, sink_healthy=self._accepted > self._pass_start)
        self._delivered += result.inserted
        self._duplicates += result.duplicates
        now, keep = utcnow(), set()
        dead: dict[tuple[str, int], list[Rejected]] = {}
        for index, reason in result.rejected:
            event, record = events[index], records[index]
            if to_hold(event, reason, now):
                keep.add(index)
                continue
            note = too_far_ahead_note() if refused_as_early(reason) else ""
            offset, segment = record.get("offset"), record.get("segment")  # as written, unless edited
            item = Rejected(
                offset if isinstance(offset, int) else 0,
                str(record["line"]).encode("utf-8"),
                f"rejected by the sink: {reason}{note}",
                str(event.event_id),
            )
            where = (str(record.get("slot", "")), segment if isinstance(segment, int) else 0)
            dead.setdefault(where, []).append(item)
        for (slot, segment), items in dead.items():
            self.dead_letters.write(slot, segment, items)
            self._rejected += len(items)
        return keep

    def _took(self, slot: Path) -> None:
        self._accepted += 1
        self._accepted_in[slot] = self._accepted_in.get(slot, 0) + 1

    def _sink_takes_what_follows(self, slot: Path, batch: Batch, live: int | None) -> bool:
        """Deliver the next batch of the slot (again later, as duplicates): True if the sink takes it."""
        cursor, events = batch.next_cursor, []
        # Only segments at or past the cursor: read_batch deletes those below it as acknowledged, and the refused
        # batch's own segment is not (it stays until that batch is delivered or dead-lettered).
        segments = [seq for seq in list_segments(slot) if seq >= cursor.segment]
        for _ in range(PROBE_BATCHES):  # past empty segments and lines that are not events
            following = read_batch(slot, cursor, current_segment=live, max_lines=self.batch_size, segments=segments)
            if following is None:
                return False  # nothing behind them is held up: wait
            events = decode_lines(following.lines)[0]
            if events:
                break
            cursor = following.next_cursor
            segments = [seq for seq in segments if seq >= cursor.segment]
        if not events:
            return False
        try:  # isolating: one bad event among them must not hide that the sink takes the others
            result = deliver_isolating(self.sink, events)
        except RefusedBatchError:
            return False
        self._took(slot)
        self._delivered += result.inserted  # stored now: delivered again with their batch, they count as duplicates
        return True


# Flushers, for the child of a fork (a prefork server or task queue): see ``Flusher._after_fork_in_child``.
_FLUSHERS: weakref.WeakSet[Flusher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for flusher in list(_FLUSHERS):
        flusher._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _has_unread(slot: Path) -> bool:
    """Whether the slot holds bytes past its cursor (cheap: directory listing and one stat), or a segment read to its
    end that is left to delete: a live writer's newest segment, kept while it appends to it, once the writer died
    (nobody claimed the slot again, and the segment stayed on disk until a writer took the slot)."""
    segments = list_segments(slot)
    if not segments:
        return False
    cursor = read_cursor(slot)
    if segments[-1] > cursor.segment:
        return True
    try:
        if (slot / segment_name(segments[-1])).stat().st_size > cursor.offset:
            return True
    except FileNotFoundError:
        return True  # rotated meanwhile: look again
    return not writer_alive(slot)


def _reached(cursor: Cursor, position: Cursor) -> bool:
    return (cursor.segment, cursor.offset) >= (position.segment, position.offset)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
