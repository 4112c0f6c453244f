"""MeteredLLM: the ``ctx.llm`` surface. Every provider call records exactly one usage event.

The event is appended to the durable spool (one ``write``) before ``create_message`` returns or raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from pydantic import TypeAdapter, ValidationError

from metering.errors import InvalidInputError, ProviderError
from metering.events import MAX_INT32, Label, Status, used_nothing
from metering.llm.attempt import Attempt
from metering.llm.budgets import BudgetTracker
from metering.llm.event_record import CallScope, event_record, prompt_fingerprint
from metering.llm.pool import PooledProvider, ProviderPool
from metering.llm.providers.output_limit import lower_limit
from metering.llm.resolution import Plan, PlatformLLM, Target, resolve_cached
from metering.llm.responses import LLMResponse, parse_json_text
from metering.llm.settings_source import SettingsSource
from metering.llm.streaming import MessageStream, note_unrecorded
from metering.llm.text import clean_text
from metering.llm.types import MISSING_USAGE, STOP_MAX_TOKENS, ProviderRequest, ResponseFormat, TokenUsage
from metering.llm.unreadable_key import unreadable_key_adapter
from metering.llm.usage import estimate_input_tokens, fill_missing

log = logging.getLogger("metering.llm")

DEFAULT_MAX_TOKENS = 1024
DEFAULT_PURPOSE = "default"
_new_tuple = tuple.__new__  # makes an Attempt from the tuple of all its fields, without its Python __new__


class EventRecorder(Protocol):
    """Durably appends one serialised event (the spool)."""

    def append_line(self, data: bytes) -> None:
        """Append one JSON line that ends in a newline."""
        ...


# The event's own bounds (metering.events): an argument the event cannot hold is refused before the call is made,
# not found out when the flusher dead-letters the event of a call that was made and paid for.
_LABEL = TypeAdapter(Label)


_VALID_PURPOSES: set[str] = set()  # purposes already checked: a handful per process, checked once each


def _check_purpose(purpose: Any) -> None:
    if isinstance(purpose, str) and purpose in _VALID_PURPOSES:  # the hot path: ≈ 0.5 µs saved per call
        return
    _check_label("purpose", purpose)
    if len(_VALID_PURPOSES) < 1024:
        _VALID_PURPOSES.add(purpose)


def _check_label(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a str, not {type(value).__name__}")
    try:
        _LABEL.validate_python(value)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {name}: {exc.errors(include_url=False)[0]['msg']}") from None


def _check_scope(scope: CallScope) -> None:
    """Who calls: ids the event cannot hold are refused when the invocation's ctx.llm is made, before any call."""
    for name in ("tenant_id", "user_id", "extension_id", "function"):
        _check_label(name, getattr(scope, name))


def _check_args(
    messages: Any,
    max_tokens: Any,
    purpose: Any,
    response_format: Any,
    system: Any = None,
    params: Mapping[str, Any] | None = None,
) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} dicts")
    if (at := _lone_surrogate(system)) is not None:
        raise _not_unicode("the system prompt", at)
    for index, message in enumerate(messages):
        # (a dict first: the ABC's isinstance costs ≈ 0.2 µs a message on the hot path)
        if (type(message) is not dict and not isinstance(message, Mapping)) or (
            "role" not in message or "content" not in message
        ):
            raise InvalidInputError("each message must be a dict with 'role' and 'content'")
        if isinstance(content := message["content"], (list, tuple)):  # a tuple reaches the provider as an array too
            _check_parts(content)
        if len(message) > 2:  # fields besides role and content: their names are sent as well
            for key in message:
                if (at := _lone_surrogate(key)) is not None:
                    raise _not_unicode(f"the name of a field of message {index}", at)
        for key, value in message.items():  # its content, a tool call's arguments, a part's text at any depth, ...
            if type(value) is str and value.isascii():  # nearly every role and content: no call
                continue
            if (at := _lone_surrogate(value)) is not None:
                raise _not_unicode(f"message {index}'s {key}", at)
    for name, value in params.items() if params else ():  # a stop sequence, ...
        if (at := _lone_surrogate(value)) is not None:
            raise _not_unicode(f"the parameter {name}", at)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 0 < max_tokens <= MAX_INT32:
        raise InvalidInputError(f"max_tokens must be a positive integer, at most {MAX_INT32}")
    _check_purpose(purpose)
    if response_format not in (None, "json"):
        raise InvalidInputError("response_format must be None or 'json'")


# Content parts whose tokens a UsageEvent cannot tell apart from text: priced at the text rate they would be billed
# several times under their price (gpt-audio: $2.50 instead of $32 per Mtok of input audio), so they are refused.
_UNMETERABLE_PARTS = frozenset({"input_audio", "audio"})


def _check_parts(parts: list[Any] | tuple[Any, ...]) -> None:
    for part in parts:
        if isinstance(part, Mapping) and part.get("type") in _UNMETERABLE_PARTS:
            raise InvalidInputError(
                f"{part['type']!r} content parts are not supported: a usage event cannot count audio tokens apart "
                "from text, so they would be billed at the model's text rate"
            )


_MAX_TEXT_DEPTH = 64


def _lone_surrogate(value: Any) -> int | None:
    """Where, in ``value`` or any text nested in it (a content part's, a tool result's, a tool call's arguments, a
    dict's keys), a text UTF-8 cannot encode holds its lone surrogate (half an emoji, the JSON escape "\\ud83d" alone,
    as an HTTP invoke's params may carry it); None if nowhere. Sent on, the SDK failed serialising the request: no
    call made, an error event recorded all the same, and a bare UnicodeEncodeError raised."""
    if value is None or (isinstance(value, str) and value.isascii()):  # nearly every prompt, role, name, ...
        return None
    pending = [(value, 0)]
    # Each container's depth when walked: walked again only from nearer the top, so a container held twice (one
    # holding itself twice) is not walked once per path (2 ** depth), and at most _MAX_TEXT_DEPTH times in all.
    walked: dict[int, tuple[int, object]] = {}  # (the container kept: its id is not reused meanwhile)
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if item.isascii():  # nearly every text: one isascii(); else one encode()
                continue
            try:
                item.encode()
            except UnicodeEncodeError as exc:
                return exc.start
        elif depth >= _MAX_TEXT_DEPTH or ((seen := walked.get(id(item))) is not None and seen[0] <= depth):
            continue  # deeper (or a container holding itself) the SDK cannot serialise either; or walked already
        elif isinstance(item, Mapping):
            walked[id(item)] = (depth, item)
            pending.extend((key, depth + 1) for key in item)
            pending.extend((nested, depth + 1) for nested in item.values())
        elif isinstance(item, list | tuple):
            walked[id(item)] = (depth, item)
            pending.extend((nested, depth + 1) for nested in item)
    return None


def _not_unicode(where: str, at: int) -> InvalidInputError:
    return InvalidInputError(
        f"{where} is not valid Unicode: it holds a lone surrogate at position {at} (half of a UTF-16 pair, such as "
        "the JSON escape \\ud83d alone), which cannot be sent; no call was made"
    )


class MeteredLLM:
    """``ctx.llm`` for one handler invocation.

    ``provider``, ``model`` and ``is_byollm`` describe the config that served the last call; ``all_byollm`` is true
    when every call so far (failed ones included) was served by the user's own LLM, so none was billed to the user,
    and ``None`` before the first call.
    """

    def __init__(
        self,
        *,
        scope: CallScope,
        settings: SettingsSource,
        platform: PlatformLLM,
        providers: ProviderPool,
        recorder: EventRecorder,
    ) -> None:
        self._scope = scope
        self._settings = settings
        self._platform = platform
        self._providers = providers
        self._recorder = recorder
        _check_scope(scope)
        self._budget = BudgetTracker(settings.budget(scope.extension_id))
        self.provider: str | None = None
        self.model: str | None = None
        self.is_byollm: bool | None = None
        self.all_byollm: bool | None = None
        self.event_ids: list[str] = []
        self._streams: set[MessageStream] = set()  # streams started and not ended yet
        # create_message calls in flight, by the task awaiting each; `end_calls` waits on the event (made only then)
        self._calls_in_flight: dict[asyncio.Task[Any], asyncio.Event | None] = {}
        self._ended = False  # set by `end_calls`: the invocation is over, no call is made for it any more
        # Events of calls that used the provider: answered, or failed with tokens or web searches in their usage
        # (billed, or paid on the user's own key; Policy A rule 2, ``used_nothing``). A failure with no usage costs
        # nothing: running it again costs nothing twice.
        self.used_event_ids: list[str] = []

    @property
    def scope(self) -> CallScope:
        return self._scope

    @property
    def calls(self) -> int:
        return self._budget.calls

    async def end_calls(self) -> None:
        """End every ``create_message`` call of this invocation still in flight in another task (one ``asyncio.gather``
        left running when another call failed, one in a task the handler never awaited), cancelling its task: each
        records its event (``cancelled``) before this returns.

        The runtime calls it before an invocation returns or raises, so that the invocation's event ids hold every
        call it made: a call recorded after them is one an Idempotency-Key's retry would pay for again.
        """
        # From now on a call is refused (never made): a task the handler started that had not reached its call yet (not
        # run yet, or between two calls) would make it after the invocation returned, billed and not in its event ids.
        self._ended = True
        current = asyncio.current_task()
        pending: list[asyncio.Event] = []
        for task in [task for task in self._calls_in_flight if task is not current]:
            recorded = self._calls_in_flight[task] = asyncio.Event()
            pending.append(recorded)
            task.cancel()
        for recorded in pending:
            await recorded.wait()

    async def close_streams(self) -> None:
        """End every stream of this invocation that is still open, recording each one's event (``cancelled``).

        The runtime calls it before an invocation returns or raises, so that a stream the handler left without
        ``async with`` is in the invocation's events. Every stream is closed; then the first error is raised.
        """
        errors: list[Exception] = []
        for stream in list(self._streams):
            try:
                await stream.close_unfinished()
            except Exception as exc:  # e.g. the spool refused its event: still close the others
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- shared steps -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._ended:
            raise RuntimeError(
                "this invocation has ended: its ctx.llm makes no more calls (a task the handler started made a call "
                "after the handler returned or raised; await it in the handler)"
            )

    def _plan(self, purpose: str) -> Plan:
        # User ids are global, but a user's own LLM (and key) serves only their tenant's calls.
        byollm = self._settings.byollm(self._scope.user_id, self._scope.tenant_id)
        return resolve_cached(byollm, self._settings.purpose(purpose), self._platform)

    def _adapter(self, target: Target) -> PooledProvider:
        """The pool's adapter for ``target``; for a BYOLLM key that cannot be decrypted, one that fails each call."""
        return unreadable_key_adapter(target) if target.key_unreadable else self._providers.get(target.config)

    def _reserve(self, system: str | None, messages: list[dict[str, Any]], max_tokens: int, attempt: int) -> int:
        """Reserve a call about to be made (refused by an enforced budget); ``_record`` settles it."""
        tracker = self._budget
        if tracker.budget is None:  # the hot path: no budget, nothing to check
            tracker.calls_in_flight += 1
            return 0
        return tracker.reserve(lambda: estimate_input_tokens(system, messages), max_tokens, failover=attempt > 0)

    def _request(
        self,
        target: Target,
        system: str | None,
        messages: list[dict[str, Any]],
        max_tokens: int,
        temperature: float | None,
        response_format: ResponseFormat,
        params: dict[str, Any],
    ) -> ProviderRequest:
        # The call's own params (its **params: a dict of its own, which adapters only read) when the target has none
        merged = params if not target.params else ({**target.params, **params} if params else dict(target.params))
        if temperature is None and "temperature" in merged:  # the purpose's (or a caller's **params): the call's own
            merged = dict(merged)
            temperature = merged.pop("temperature")
        # model, system, messages, max_tokens, temperature, response_format, params: positional (by keyword, the
        # dataclass's __init__ costs ≈ 0.3 µs more on the hot path)
        return ProviderRequest(target.config.model, system, messages, max_tokens, temperature, response_format, merged)

    def _record(
        self,
        call: Attempt,
        *,
        usage: TokenUsage,
        stop_reason: str | None,
        status: Status,
        error_type: str | None,
        ttft_ms: float | None = None,
    ) -> str:
        target, attempt, purpose, occurred_at, started, max_tokens, fingerprint, is_stream, reserved = call
        latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
        flags = self._budget.settle(reserved, usage.input_tokens + usage.output_tokens)  # first: the call was made
        record = event_record(
            scope=self._scope,
            call_index=self._budget.calls - 1,
            occurred_at=occurred_at,
            purpose=purpose,
            provider=target.config.provider,
            model=target.config.model,
            is_byollm=target.is_byollm,
            is_failover=attempt > 0,
            is_stream=is_stream,
            usage=usage,
            max_tokens=max_tokens,
            stop_reason=stop_reason,
            latency_ms=latency_ms,
            time_to_first_token_ms=ttft_ms,
            status=status,
            error_type=error_type,
            fingerprint=fingerprint,
            budget_exceeded=flags,
        )
        self._recorder.append_line(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        event_id: str = record["event_id"]
        self.event_ids.append(event_id)
        if self.all_byollm is not False:  # one platform call (a failover included) makes the invocation billed
            self.all_byollm = target.is_byollm
        if status is Status.OK or not used_nothing(status, usage.completeness, usage.total_tokens, usage.web_searches):
            self.used_event_ids.append(event_id)
        return event_id

    def _served_by(self, target: Target) -> None:
        self.provider = target.config.provider
        self.model = target.config.model
        self.is_byollm = target.is_byollm

    # -- the public surface -------------------------------------------------------------------

    async def create_message(
        self,
        *,
        messages: list[dict[str, Any]],
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        purpose: str = DEFAULT_PURPOSE,
        response_format: ResponseFormat = None,
        temperature: float | None = None,
        **params: Any,
    ) -> LLMResponse:
        _check_args(messages, max_tokens, purpose, response_format, system, params)
        self._check_open()
        fingerprint = prompt_fingerprint(system, messages)
        plan = self._plan(purpose)
        # A call whose max_tokens the model refuses, stating its limit, is made once more at that limit, on the same
        # LLM, before any failover: inserted after the current try (a list iterator reads it next).
        if plan.fallback is None:  # (no comprehension: ≈ 0.3 µs on the hot path)
            last, tries = 0, [(0, plan.primary, max_tokens)]
        else:
            last, tries = 1, [(0, plan.primary, max_tokens), (1, plan.fallback, max_tokens)]
        for position, (attempt, target, call_max_tokens) in enumerate(tries):
            request = self._request(target, system, messages, call_max_tokens, temperature, response_format, params)
            # (inline: the hot path) a BYOLLM key that cannot be decrypted gets an adapter that fails each call
            pooled = unreadable_key_adapter(target) if target.key_unreadable else self._providers.get(target.config)
            # Reserved last, with nothing between it and the call that could fail: `_record` settles it.
            if self._budget.budget is None:  # (inline: the hot path) no budget, nothing to check; see `_reserve`
                self._budget.calls_in_flight += 1
                reserved = 0
            else:
                reserved = self._reserve(system, messages, call_max_tokens, attempt)
            occurred_at = datetime.now(UTC)
            started = time.perf_counter()
            # (tuple.__new__: the NamedTuple's own __new__ is a Python function, ≈ 0.2 µs more on the hot path)
            common = _new_tuple(
                Attempt,
                (target, attempt, purpose, occurred_at, started, call_max_tokens, fingerprint, False, reserved),
            )
            task = asyncio.current_task()
            if task is not None:
                self._calls_in_flight[task] = None
            pooled.in_use += 1  # the pool closes a retired adapter only once no call uses it (released below)
            try:
                result = await pooled.provider.complete(request)
            except ProviderError as exc:
                self._record(
                    common,
                    usage=MISSING_USAGE,
                    stop_reason=None,
                    status=Status.ERROR,
                    error_type=exc.error_type,
                )
                self._served_by(target)
                if call_max_tokens == max_tokens and (limit := lower_limit(exc, max_tokens)) is not None:
                    tries.insert(position + 1, (attempt, target, limit))  # a call of its own, with its own event
                    continue
                if attempt < last:
                    log.warning("BYOLLM call failed (%s); failing over to the platform LLM", exc.error_type)
                    continue
                raise
            except asyncio.CancelledError as cancelled:
                try:
                    self._record(
                        common, usage=MISSING_USAGE, stop_reason=None, status=Status.CANCELLED, error_type=None
                    )
                except Exception as error:  # the spool refused it: the cancellation stays a cancellation
                    note_unrecorded(cancelled, error)
                raise
            except Exception as exc:
                self._record(
                    common,
                    usage=MISSING_USAGE,
                    stop_reason=None,
                    status=Status.ERROR,
                    error_type=f"internal:{type(exc).__name__}"[:100],
                )
                raise
            finally:  # recorded (or the spool refused its event): no longer in flight
                self._providers.release(pooled)
                if task is not None and (recorded := self._calls_in_flight.pop(task, None)) is not None:
                    recorded.set()
            text = clean_text(result.text)  # no lone surrogate reaches the caller (it could not be encoded)
            # an OpenAI refusal is output the provider charges, not text: an estimate counts it
            output = text + result.refusal if result.refusal else text
            usage = fill_missing(result.usage, system, messages, output, answered=True)
            event_id = self._record(
                common, usage=usage, stop_reason=result.stop_reason, status=Status.OK, error_type=None
            )
            self._served_by(target)
            parsed = None
            if response_format == "json":
                cut_off_at = call_max_tokens if result.stop_reason == STOP_MAX_TOKENS else None
                parsed = parse_json_text(text, cut_off_at=cut_off_at, stop_reason=result.stop_reason)
            # text, provider, model, is_byollm, stop_reason, usage, event_id, response_format, parsed: positional (by
            # keyword, the dataclass's __init__ costs ≈ 0.3 µs more on the hot path)
            config = target.config
            return LLMResponse(
                text,
                config.provider,
                config.model,
                target.is_byollm,
                result.stop_reason,
                usage,
                event_id,
                response_format,
                parsed,
            )
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def stream_message(
        self,
        *,
        messages: list[dict[str, Any]],
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        purpose: str = DEFAULT_PURPOSE,
        temperature: float | None = None,
        **params: Any,
    ) -> MessageStream:
        """A stream of text chunks; ``.usage``, ``.text`` and ``.response`` are set once it ends.

        Iterate it once (``async for chunk in ctx.llm.stream_message(...)``), preferably inside
        ``async with``, so an abandoned stream is recorded at once as ``cancelled``.
        """
        _check_args(messages, max_tokens, purpose, None, system, params)
        return MessageStream(
            self,
            system=system,
            messages=messages,
            max_tokens=max_tokens,
            purpose=purpose,
            temperature=temperature,
            params=params,
        )
