"""The ``preflab`` command line: parse -> load config -> call one library function -> print a summary.

Commands stay thin; heavy libraries are imported inside each command so ``preflab --help``
is instant. Sub-command groups: ``sandbox``, ``rm``, ``quality``, ``guidelines``, ``outcomes``.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from preflab.config import ConfigError

app = typer.Typer(help="preflab: an RLHF workbench, from calibrated raters to a promoted policy.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
sandbox_app = typer.Typer(help="The simulated support domain and its base model.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")

console = Console()


@app.callback()
def _root() -> None:
    """preflab: an RLHF workbench."""


@app.command()
def version() -> None:
    """Print the preflab version."""
    from preflab import __version__

    console.print(f"preflab {__version__}")


# ---- sandbox --------------------------------------------------------------------------

# ---- serve (rater web app) --------------------------------------------------------------

@app.command()
def serve(
    db: str = typer.Option("sqlite:///preflab.db", "--db", help="SQLAlchemy URL (or SQLite path) of the store."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="TCP port."),
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes (safe: the app keeps no state in memory)."),
    project: str = typer.Option("default", help="Project served (created on first start)."),
    secret_key: str = typer.Option(None, envvar="PREFLAB_SECRET_KEY",
                                   help="HMAC key for sessions; random per start if unset (sessions then end on restart)."),
    cookie_secure: bool = typer.Option(False, help="Mark the session cookie Secure (behind HTTPS)."),
) -> None:
    """Run the rater web app (uvicorn); on first start create an admin and print its credentials once."""
    from preflab.web.server import serve as run_serve

    run_serve(db_url=db, host=host, port=port, workers=workers, project=project, secret_key=secret_key,
              cookie_secure=cookie_secure, echo=console.print)


# ---- report, outcomes (report/) ---------------------------------------------------------

outcomes_app = typer.Typer(help="Production outcomes: import logs, compare model versions.", no_args_is_help=True)
app.add_typer(outcomes_app, name="outcomes")


@app.command("report")
def report_cmd(
    run_dir: str = typer.Argument(..., help="Run directory to report on (see docs/report.md for the files read)."),
    title: str = typer.Option(None, help="Report title (default: the run directory's name)."),
) -> None:
    """Write RUN_DIR/report.html (self-contained, plots embedded) and RUN_DIR/report.md."""
    from preflab.report.html import ReportError, render_report

    try:
        rep = render_report(run_dir, title=title)
    except ReportError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"sections: {', '.join(rep.sections)}")
    for p in rep.problems:
        console.print(f"[yellow]warning:[/yellow] {p}")
    console.print(f"wrote {rep.html_path} and {rep.md_path}")


@outcomes_app.command("import")
def outcomes_import(
    file: str = typer.Argument(..., help="Production log: .csv (with header) or .jsonl."),
    run: str = typer.Option(..., "--run", help="Run directory; rows are appended to RUN/outcomes/logs.jsonl."),
) -> None:
    """Validate a production log and import it (all rows or none)."""
    from preflab.report.outcomes import OutcomeImportError, import_outcomes

    try:
        res = import_outcomes(file, run)
    except OutcomeImportError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"imported {res['imported']} conversations ({res['by_version']}); {res['total']} in {res['path']}")


@outcomes_app.command("compare")
def outcomes_compare(
    baseline: str = typer.Option(..., help="Model version before (e.g. sft)."),
    candidate: str = typer.Option(..., help="Model version after (e.g. ppo_v2)."),
    run: str = typer.Option(None, "--run", help="Run directory with imported outcomes; writes RUN/outcomes/comparison.json."),
    file: str = typer.Option(None, "--file", help="Compare straight from a log file instead (nothing written)."),
    method: str = typer.Option("newcombe", help="Interval for the escalation difference: newcombe or wald."),
    simulated: bool = typer.Option(False, help="Mark the logs as simulated in comparison.json."),
) -> None:
    """Compare two model versions: escalation (two-proportion CI), CSAT and handle time (Welch CIs)."""
    from rich.table import Table

    from preflab.report.outcomes import (
        OutcomeImportError,
        compare_versions,
        load_run_outcomes,
        read_outcomes,
        write_comparison,
    )

    if (run is None) == (file is None):
        console.print("[red]error:[/red] give exactly one of --run or --file")
        raise typer.Exit(2)
    try:
        records = read_outcomes(file) if file else load_run_outcomes(run)
        comp = compare_versions(records, baseline, candidate, method=method)
    except (OutcomeImportError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    t = Table(title=f"{candidate} vs {baseline}")
    for c in ("metric", baseline, candidate, "difference", "95% CI", "p"):
        t.add_column(c)
    for name, block in (("escalation rate", comp["escalation"]), ("CSAT", comp["csat"]),
                        ("handle time (min)", comp["handle_time_min"])):
        if block:
            t.add_row(name, f"{block['baseline']:.3f}", f"{block['candidate']:.3f}", f"{block['diff']:+.3f}",
                      f"[{block['ci'][0]:+.3f}, {block['ci'][1]:+.3f}]", f"{block['p_value']:.2g}")
    console.print(t)
    if run:
        console.print(f"wrote {write_comparison(run, comp, simulated=simulated)}")


# ---- end of commands -------------------------------------------------------------------


def main() -> None:
    try:
        app()
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
