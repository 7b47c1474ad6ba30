"""The `metering` command: providers, meters, customers, usage, backfills, the service, a demo.

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or bad input. Errors print as one
line; `--debug` shows the traceback.
"""

from metering_core.cli import bundle as _bundle  # noqa: F401  (registers `metering aws`)
from metering_core.cli import commands as _commands  # noqa: F401  (registers the subcommands)
from metering_core.cli import events as _events  # noqa: F401  (registers `events`, `export`)
from metering_core.cli import mirrors as _mirrors  # noqa: F401  (registers `mirror`)
from metering_core.cli.app import app
from metering_core.plugins import plugin_manager

plugin_manager().hook.register_commands(cli=app)  # a plugin's own commands (`metering db`)

__all__ = ["app", "main"]


def main() -> None:
    """The console script's entry point."""
    app()
