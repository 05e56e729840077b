"""The `robusteval` command group: one-line user errors (exit 2), logging verbosity, --version."""

from __future__ import annotations

import logging
import sys

import click

from robusteval.core.errors import UsageError

logger = logging.getLogger("robusteval")


class FriendlyGroup(click.Group):
    """Prints a user error (`UsageError`) as one clear line with exit code 2; anything else is a bug and keeps
    its traceback (exit 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="robusteval")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Evaluate adversarial and certified robustness of (joint generative-discriminative) image classifiers."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
