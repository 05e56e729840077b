"""`python -m robusteval.cli`: the same as the `robusteval` command."""

from robusteval.cli import main

main()
