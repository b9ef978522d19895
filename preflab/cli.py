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

# ---- end of commands -------------------------------------------------------------------


def main() -> None:
    try:
        app()
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
