"""The `robusteval` command group: one-line user errors (exit 2), logging verbosity, --version."""

from __future__ import annotations

import logging
import sys

import click

from robusteval.core.atomic_files import is_disk_full
from robusteval.core.errors import UsageError

logger = logging.getLogger("robusteval")


class OneValueCommand(click.Command):
    """A command that refuses an option given under two of its names (`--n 500 --draws 300`, `--resume
    --no-resume`), which click would settle silently by keeping the last."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_two_names(self, args)
        return super().parse_args(ctx, args)


def refuse_two_names(command: click.Command, args: list[str]) -> None:
    """A UsageError when one option of `command` appears in `args` under two different names."""
    names: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option) and not param.multiple and not param.count:
            names.update((name, param) for name in (*param.opts, *param.secondary_opts))
    first_seen: dict[str, str] = {}
    position = 0
    while position < len(args) and args[position] != "--":
        token = args[position]
        param = names.get(token.split("=", 1)[0])
        if param is not None:
            name = token.split("=", 1)[0]
            first = first_seen.setdefault(str(param.name), name)
            if first != name:
                raise UsageError(f"{first} and {name} are two names of one option of `{command.name}`; give it once")
            if not param.is_flag and "=" not in token:
                position += 1  # its value, whatever it looks like
        position += 1


class FriendlyGroup(click.Group):
    """Prints a user error (`UsageError`) as one clear line with exit code 2; anything else is a bug and keeps
    its traceback (exit 1). Its commands refuse an option given under two names (`OneValueCommand`)."""

    command_class = OneValueCommand
    group_class = type  # subgroups are FriendlyGroups too, so their commands are OneValueCommands

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except OSError as error:
            if not is_disk_full(error):
                raise
            # A full disk where no writer names its file (a figure, a report): still one line.
            where = f" writing {error.filename}" if error.filename else ""
            click.echo(f"error: no space left on device{where}; free space and run the command again", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="robusteval")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Evaluate adversarial and certified robustness of (joint generative-discriminative) image classifiers."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
