"""Files and flags that exhausted memory, ended in a traceback or were silently accepted (issue 30, items 7-9),
each through the command line where a user meets it: one line, exit 2, naming the flag or file and what was
expected.

Synthetic official files come from the builders of test_official_checkpoints.py and test_official_diffusion*.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error as shared_one_line_error
from cli_helpers import summary_without_time
from click.testing import CliRunner
from test_official_checkpoints import jem_file, make_cifar10
from test_official_diffusion import randomise
from test_official_diffusion_cli import VAE_F8, egc_files, jdm_files  # noqa: F401 (module fixtures)

import robusteval
from robusteval.cli import main
from robusteval.model_zoo.official.kl_autoencoder import AutoencoderKL
from robusteval.model_zoo.registry import WEIGHTS_DIR

STANDARD_WEIGHTS = WEIGHTS_DIR / "standard-digits.safetensors"
CERTIFY = ["certify", "--model", "gaussian", "--sigma", "0.25", "--n0", "10", "--n", "50", "--n-images", "4",
           "--device", "cpu", "--no-compile", "--quiet"]
# 60 (image, draw) pairs a pass: each image is its own batch, appended to samples.jsonl by its own write.
CERTIFY_BY_IMAGE = [*CERTIFY, "--batch-size", "60"]
PREDICT_DIGITS = ["predict", "--model", "standard", "--sigma", "0.25", "--n", "20", "--n-images", "1", "--device",
                  "cpu", "--no-compile", "--quiet"]


def one_line_error(result, *fragments: str) -> str:
    """The shared one-line error, and nothing of it spills onto the lines before."""
    message = shared_one_line_error(result, *fragments)
    lines = result.stderr.strip().splitlines()
    assert not any(line.startswith(("error", "  ")) for line in lines[:-1]), result.stderr  # nothing spills over
    return message


# --- JEM's replay buffer: declared sizes, laziness, shape, finiteness ---------------------------------------------
@pytest.fixture(scope="module")
def jem_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jem")
    jem_file(root / "jem.pt")
    contents = torch.load(root / "jem.pt", weights_only=True)
    variants = {
        # 1,000 bytes of zeros declaring 10⁹ images: 12 TB once anything touches it.
        "huge": torch.zeros(1).expand(10**9, 3, 32, 32),
        "nan": torch.full((40, 3, 32, 32), float("nan")),
        "wrong shape": torch.rand(40, 3, 28, 28),
    }
    files = {"data": make_cifar10(root / "data"), "jem": root / "jem.pt"}
    for name, buffer in variants.items():
        files[name] = root / f"jem-{name.replace(' ', '-')}.pt"
        torch.save({**contents, "replay_buffer": buffer}, files[name])
    return files


def jem_args(files: dict[str, Path], variant: str) -> list[str]:
    return ["--model", "jem", "--dataset", "cifar10", "--data-dir", str(files["data"]), "--checkpoint",
            str(files[variant]), "--device", "cpu"]


def test_a_replay_buffer_declaring_more_than_the_file_holds_is_refused_before_reading(jem_files, tmp_path):
    assert jem_files["huge"].stat().st_size < 2_000_000  # the small WRN-10-2 weights
    result = CliRunner().invoke(main, ["certify", *jem_args(jem_files, "huge"), "--sigma", "0.25", "--n-images", "1",
                                       "--n", "10", "--out", str(tmp_path / "c")])
    one_line_error(result, str(jem_files["huge"]), "'replay_buffer'", "(1000000000, 3, 32, 32)",
                   "more than the whole file holds")


def test_a_nan_replay_buffer_is_never_read_by_certify_and_refused_by_sample(jem_files, tmp_path):
    certify = CliRunner().invoke(main, ["certify", *jem_args(jem_files, "nan"), "--sigma", "0.25", "--n-images", "1",
                                        "--n0", "4", "--n", "8", "--no-compile", "--quiet",
                                        "--out", str(tmp_path / "c")])
    assert certify.exit_code == 0, certify.output  # certify never reads the buffer
    model = robusteval.create_model("jem", dataset="cifar10", checkpoint=jem_files["nan"])
    assert model.replay_source is not None and model.replay_source._images is None  # mapped, not converted
    sample = CliRunner().invoke(main, ["sample", *jem_args(jem_files, "nan"), "--n", "2",
                                       "--out", str(tmp_path / "s.png")])
    one_line_error(sample, str(jem_files["nan"]), "'replay_buffer' holds non-finite values", "in 40 of its 40 images")
    assert not (tmp_path / "s.png").exists()


def test_a_replay_buffer_of_the_wrong_shape_is_refused(jem_files, tmp_path):
    result = CliRunner().invoke(main, ["sample", *jem_args(jem_files, "wrong shape"), "--n", "2",
                                       "--out", str(tmp_path / "s.png")])
    one_line_error(result, str(jem_files["wrong shape"]), "(40, 3, 28, 28)", "expected float images of shape "
                   "(N, 3, 32, 32)")


def test_an_official_jem_file_on_digits_names_the_data_sets_its_loader_takes(jem_files, tmp_path):
    result = CliRunner().invoke(main, [*PREDICT_DIGITS[:2], "jem", *PREDICT_DIGITS[3:], "--checkpoint",
                                       str(jem_files["jem"]), "--out", str(tmp_path / "p")])
    one_line_error(result, str(jem_files["jem"]), "official 'jem' architecture", "cifar10, cifar100, not digits")


# --- files that are not checkpoints --------------------------------------------------------------------------------
class NotAllowed:
    """A class no weights file needs: unpickling it must be refused by name."""


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    files = {name: folder / f"{name}.pt" for name in ("empty", "plain pickle", "truncated", "refused")}
    files["empty"].write_bytes(b"")
    state = robusteval.create_model("standard").state_dict()
    files["plain pickle"].write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()}, protocol=4))
    torch.save(state, folder / "whole.pt")
    whole = (folder / "whole.pt").read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    torch.save({**state, "extra": NotAllowed()}, files["refused"])
    return files


@pytest.mark.parametrize("kind, fragments", [
    ("empty", ["is empty (0 bytes)"]),
    ("plain pickle", ["is not a file torch.save writes", "opcode 149"]),
    ("truncated", ["truncated or not a torch checkpoint", "failed finding central directory"]),
    ("refused", ["pickles the class/function", "NotAllowed", "refuses to unpickle"]),
])
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(tmp_path, kind, fragments):
    path = _bad_checkpoints(tmp_path)[kind]
    result = CliRunner().invoke(main, [*PREDICT_DIGITS, "--checkpoint", str(path), "--out", str(tmp_path / "p")])
    message = one_line_error(result, str(path), *fragments)
    assert "file an issue" not in message and not message.endswith(": ")


def test_a_device_as_checkpoint_is_not_a_regular_file(tmp_path):
    result = CliRunner().invoke(main, [*PREDICT_DIGITS, "--checkpoint", "/dev/zero", "--out", str(tmp_path / "p")])
    one_line_error(result, "/dev/zero is not a regular file")


def test_integer_weights_are_refused_naming_the_tensor(tmp_path):
    state = robusteval.create_model("standard").state_dict()
    path = tmp_path / "int.pt"
    torch.save({k: (v * 100).round().long() if v.is_floating_point() else v for k, v in state.items()}, path)
    result = CliRunner().invoke(main, [*PREDICT_DIGITS, "--checkpoint", str(path), "--out", str(tmp_path / "p")])
    one_line_error(result, str(path), "integer tensors where the architecture holds float weights", "torch.int64")


@pytest.mark.parametrize("kind", ["refused", "truncated"])
def test_a_vae_that_cannot_be_read_is_one_line_like_the_checkpoint(egc_files, tmp_path, kind):  # noqa: F811
    path = _bad_checkpoints(tmp_path)[kind]
    result = CliRunner().invoke(main, [
        "predict", "--model", "egc", "--dataset", "imagenet", "--data-dir", str(egc_files["data"]), "--checkpoint",
        str(egc_files["checkpoint"]), "--model-config", str(egc_files["config"]), "--vae", str(path), "--device",
        "cpu", "--sigma", "0.25", "--n-images", "1", "--n", "2", "--batch-size", "2", "--no-compile",
        "--out", str(tmp_path / "p")])
    message = one_line_error(result, str(path))
    if kind == "refused":
        assert "pickles the class/function" in message and "NotAllowed" in message
    else:  # no advice to unpickle arbitrary code for a file that is merely cut short
        assert "the file is truncated or not a torch checkpoint" in message and "allow" not in message


# --- companion data: the autoencoder's downsampling ------------------------------------------------------------
def test_an_autoencoder_downsampling_by_2_instead_of_8_is_refused(egc_files, tmp_path):  # noqa: F811
    path = tmp_path / "vae-f2.pth"
    torch.save(randomise(AutoencoderKL(replace(VAE_F8, ch_mult=(1, 2))), 3), path)
    result = CliRunner().invoke(main, [
        "predict", "--model", "egc", "--dataset", "imagenet", "--data-dir", str(egc_files["data"]), "--checkpoint",
        str(egc_files["checkpoint"]), "--model-config", str(egc_files["config"]), "--vae", str(path), "--device",
        "cpu", "--sigma", "0.25", "--n-images", "1", "--n", "2", "--batch-size", "2", "--no-compile",
        "--out", str(tmp_path / "p")])
    one_line_error(result, str(path), "downsamples by 2", "downsampled by 8", "128×128 latents instead of 32×32")


# --- --model-config: size, types, ranges ----------------------------------------------------------------------
def test_a_model_config_larger_than_16_kib_is_refused_before_reading_it(jdm_files, tmp_path):  # noqa: F811
    result = CliRunner().invoke(main, ["predict", "--model", "jdm", "--dataset", "cifar10", "--data-dir",
                                       str(jdm_files["data"]), "--checkpoint", str(jdm_files["checkpoint"]),
                                       "--model-config", "/dev/zero", "--device", "cpu", "--sigma", "0.25",
                                       "--n-images", "1", "--n", "2", "--batch-size", "2", "--out",
                                       str(tmp_path / "p")])
    one_line_error(result, "--model-config /dev/zero", "larger than 16 KiB")


@pytest.mark.parametrize("model, flags, fragments", [
    ("jdm", {"num_heads": "two"}, ["'num_heads' must be an integer >= 1, got 'two'"]),
    ("jdm", {"num_heads": 0}, ["'num_heads' must be an integer >= 1, got 0"]),
    ("jdm", {"num_heads": 2.7}, ["'num_heads' must be an integer >= 1, got 2.7"]),
    ("jdm", {"diffusion_steps": -5}, ["'diffusion_steps' must be an integer >= 1, got -5"]),
    ("jdm", {"diffusion_steps": 1}, ["diffusion_steps 1", "outside (0, 1)"]),
    ("jdm", {"attention_resolutions": "0"}, ["'attention_resolutions' must be a list", "got '0'"]),
    ("jdm", {"attention_resolutions": "16,64"}, ["'attention_resolutions' '16,64'", "from 1 to the image size 32"]),
    ("jdm", {"image_size": 0}, ["'image_size' must be an integer >= 1, got 0"]),
    ("jdm", {"image_size": 64}, ["'image_size' 64 differs from the 32×32 images"]),
    ("jdm", {"use_scale_shift_norm": "yes"}, ["'use_scale_shift_norm' must be true or false"]),
    ("egc", {"num_heads": 2.7}, ["'num_heads' must be an integer >= 1, got 2.7"]),
    ("egc", {"image_size": 0}, ["'image_size' must be an integer >= 1, got 0"]),
    ("egc", {"num_heads": 2, "diffusion_steps": 5}, ["diffusion_steps 5, linear_start", "outside (0, 1)"]),
    ("egc", {"num_heads": 2, "linear_end": 2}, ["'linear_end' must be a number in (0, 1), got 2"]),
    ("egc", {"num_heads": 2, "pool": "max"}, ["'pool' must be 'sattn', 'attn' or 'adaptive'"]),
])
def test_model_config_values_are_checked_against_the_architectures_options(jdm_files, egc_files, tmp_path,  # noqa: F811
                                                                           model, flags, fragments):
    config = tmp_path / "flags.json"
    config.write_text(json.dumps(flags))
    files, dataset = (jdm_files, "cifar10") if model == "jdm" else (egc_files, "imagenet")
    extra = ["--vae", str(files["vae"])] if model == "egc" else []
    result = CliRunner().invoke(main, ["predict", "--model", model, "--dataset", dataset, "--data-dir",
                                       str(files["data"]), "--checkpoint", str(files["checkpoint"]), *extra,
                                       "--model-config", str(config), "--device", "cpu", "--sigma", "0.25",
                                       "--n-images", "1", "--n", "2", "--batch-size", "2", "--no-compile",
                                       "--out", str(tmp_path / "p")])
    one_line_error(result, "--model-config", *fragments)


# --- the command line itself ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, names", [
    ([*CERTIFY, "--n", "500", "--draws", "300"], "--n and --draws"),
    (["run", "--model", "standard", "--attack", "fgsm", "--device", "cpu", "--n", "5", "--points", "3"],
     "--n and --points"),
    ([*CERTIFY, "--resume", "--no-resume"], "--resume and --no-resume"),
])
def test_one_option_given_under_two_names_is_an_error(tmp_path, args, names):
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x")])
    one_line_error(result, names, "two names of one option")
    assert not (tmp_path / "x").exists()


def test_the_same_name_twice_and_option_values_that_look_like_names_still_work(tmp_path):
    result = CliRunner().invoke(main, [*CERTIFY, "--n", "50", "--out", str(tmp_path / "--draws")])
    assert result.exit_code == 0, result.output


def test_an_out_at_a_dangling_symlink_names_the_link(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone" / "away")
    result = CliRunner().invoke(main, [*CERTIFY, "--out", str(link)])
    one_line_error(result, f"{link} is a symbolic link to {tmp_path / 'gone' / 'away'}, which does not exist")


# --- run files: a torn line mid-file, a full disk ----------------------------------------------------------------
def test_a_torn_line_mid_file_is_reported_with_the_records_it_drops_and_they_are_recomputed(tmp_path, caplog):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(out)]).exit_code == 0
    intact = summary_without_time(out)
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    samples.write_text(lines[0] + lines[1][: len(lines[1]) // 2] + "\n" + "".join(lines[2:]))
    (out / "summary.json").unlink()
    with caplog.at_level(logging.WARNING, logger="robusteval"):
        again = runner.invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(out)])
    assert again.exit_code == 0, again.output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{samples} line 2 is damaged" in w and "2 intact records are dropped" in w for w in warnings), warnings
    assert summary_without_time(out) == intact
    assert len(samples.read_text().splitlines()) == 4


def test_a_torn_last_line_is_a_killed_write_and_not_reported(tmp_path, caplog):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(out)]).exit_code == 0
    samples = out / "samples.jsonl"
    text = samples.read_text()
    samples.write_text(text[: len(text) - 20])
    (out / "summary.json").unlink()
    with caplog.at_level(logging.WARNING, logger="robusteval"):
        assert runner.invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(out)]).exit_code == 0
    assert not [r for r in caplog.records if "is damaged" in r.getMessage()]


def test_a_full_disk_is_one_line_saying_where_and_how_much_and_the_resume_is_exact(tmp_path, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(tmp_path / "whole")]).exit_code == 0
    intact = summary_without_time(tmp_path / "whole")

    out = tmp_path / "run"
    samples = out / "samples.jsonl"
    real_write = os.write
    calls = {"samples": 0}

    def filling_write(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(samples):
            calls["samples"] += 1
            if calls["samples"] == 3:  # the third batch: half of it fits, then the device is full
                return real_write(fd, bytes(data)[: len(data) // 2])
            if calls["samples"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_write)
    full = runner.invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(out)])
    monkeypatch.undo()
    one_line_error(full, "no space left on device writing", str(samples), "batch 2 (1 record,",
                   "keeps the 2 records of the batches before it")
    assert len(samples.read_text().splitlines()) == 2 and samples.read_text().endswith("\n")  # no torn tail
    resumed = runner.invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert summary_without_time(out) == intact


def test_a_full_disk_while_writing_the_summary_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = os.write

    def full_for_summary(fd: int, data) -> int:
        if ".summary.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_for_summary)
    result = CliRunner().invoke(main, [*CERTIFY_BY_IMAGE, "--out", str(out)])
    monkeypatch.undo()
    one_line_error(result, f"no space left on device writing {out / 'summary.json'}", "0 of")
    assert not (out / "summary.json").exists() and not list(out.glob(".summary.json.*"))
