"""One exception type for user errors: the CLI prints it in one line (exit 2); a bug keeps its traceback (exit 1)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from robusteval import cli
from robusteval.core.checkpoints import CheckpointError
from robusteval.core.errors import MissingFileError, UsageError
from robusteval.core.interface import CapabilityError
from robusteval.core.names import UnknownNameError
from robusteval.data import DatasetError, load_dataset
from robusteval.reports.loading import RunFormatError
from robusteval.reports.regression import BaselineError
from robusteval.runs import RunConfigMismatch


@pytest.mark.parametrize("error", [CheckpointError, DatasetError, MissingFileError, UnknownNameError, BaselineError,
                                   RunFormatError, RunConfigMismatch])
def test_every_user_error_is_a_usage_error_and_keeps_its_builtin_base(error: type[Exception]) -> None:
    assert issubclass(error, UsageError) and issubclass(error, ValueError)
    assert issubclass(CapabilityError, UsageError) and issubclass(CapabilityError, NotImplementedError)
    assert issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(RunConfigMismatch, RuntimeError)


def test_missing_data_file_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="no such .npz file"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_cli_prints_a_usage_error_in_one_line_with_exit_2() -> None:
    result = CliRunner().invoke(cli.main, ["run", "--model", "standrd", "--n", "2"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith("error: unknown model 'standrd'. Did you mean: standard")


def test_cli_lets_a_bug_raise_with_exit_1(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("a genuine bug, not the user's mistake")

    monkeypatch.setattr("robusteval.jobs.load_dataset", broken)
    result = CliRunner().invoke(cli.main, ["counterfactual", "--model", "jdm", "--n", "1"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError) and "genuine bug" in str(result.exception)
    assert "error:" not in result.output
