"""One place that turns user mistakes into a clear message and an exit code, never a traceback."""

from __future__ import annotations

import sys

import click

from movielm_fast.errors import UserError


class CleanErrors(click.Group):
    """UserError -> "error: ..." on stderr and exit code 2; Ctrl-C -> a resume hint and exit code 130.
    Used by the main group and by sub-groups, so they behave the same when invoked on their own (tests)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is saved; run the same command again to resume", err=True)
            sys.exit(130)
