"""`python -m robusteval` (what torchrun launches: `torchrun ... -m robusteval certify ...`)."""

from robusteval.cli import main

main(prog_name="robusteval")
