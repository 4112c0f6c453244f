"""``metering demo``: generate the demo traffic (``demo_data``) with a progress bar and show what was metered."""

from __future__ import annotations

from collections.abc import Callable

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metering.cli import demo_data
from metering.cli.common import console, services, usage_table
from metering.db.event_store import events_for_invocations
from metering.wiring import Services


def generate_with_progress(
    svc: Services, print_outcome: Callable[[Progress, demo_data.Outcome], None] | None = None
) -> demo_data.DemoReport:
    """``demo_data.generate`` behind a progress bar (one tick per invocation); failures are printed."""
    plan = demo_data.steps()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("generating demo traffic", total=len(plan))

        def advance(outcome: demo_data.Outcome) -> None:
            if outcome.error is not None:
                progress.console.print(
                    f"[bold]{escape(outcome.step.label)}[/]: [red]{escape(str(outcome.error))}[/]", markup=True
                )
            elif print_outcome is not None:
                print_outcome(progress, outcome)
            progress.update(task, advance=1, description=outcome.step.label)

        return demo_data.generate(svc, plan, on_step=advance)


def _print_showcase(progress: Progress, outcome: demo_data.Outcome) -> None:
    if outcome.step.showcase:
        progress.console.print(
            f"[bold]{escape(outcome.step.user.id)}[/] {escape(outcome.step.function)}: {escape(str(outcome.result))}",
            markup=True,
        )


def demo() -> None:
    """Seed BYOLLM and per-purpose settings, run the bundled extensions for several users, print the usage."""
    with services() as svc:
        report = generate_with_progress(svc, _print_showcase)
        showcase = [o.invocation_id for o in report.outcomes if o.step.showcase and o.invocation_id is not None]
        with svc.sessions() as session:
            rows = events_for_invocations(session, showcase)
        console.print(usage_table(rows, title=f"Metered usage of the first invocations ({len(rows)} provider calls)"))
        console.print(f"Demo traffic: {report.summary()}.")
        if note := report.rerun_note():
            console.print(note, markup=False)
        if not report.delivered:
            console.print(
                "[yellow]Some events are still in the spool: `metering spool drain` delivers them.[/]", markup=True
            )
        console.print(
            f"Database: {svc.settings.resolved_database_url}\n"
            "Provider 'simulated' means no platform API key is set (ANTHROPIC_API_KEY); "
            "calls with byollm=yes are not billed to the user (Policy A). "
            "`metering serve --demo` serves this data with the API, /docs and /metrics."
        )
