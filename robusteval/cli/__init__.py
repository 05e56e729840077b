"""The `robusteval` command line: parse options, call the job the Python API calls, print.

`main` is the group (`group`); its commands live in `zoo` (list, train), `evaluate`
(run, certify, predict, denoise, sample, counterfactual) and `reports`
(report, check, benchmark). `options` holds what commands share, above all
`job_options`: the flags of `robusteval.jobs.JobOptions`.
"""

from robusteval.cli import evaluate, reports, scale, zoo  # noqa: F401 (importing them registers their commands)
from robusteval.cli.group import main

__all__ = ["main"]
