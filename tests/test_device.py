"""Device independence: resume across device strings, the noise definition, generators of either device,
device selection, deterministic mode. Tests marked `cuda` compare CPU and GPU and are skipped without one."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

import robusteval
from robusteval.core import determinism, devices, draws
from robusteval.data import load_dataset
from robusteval.jobs import JobOptions, resolve
from robusteval.runs import CONFIG_FILE, RunConfigMismatch, RunDirectory
from robusteval.smoothing.sampler import ESTIMATION, NoiseSource, Phase, _NoisyPasses

cuda = pytest.mark.cuda


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(autouse=True)
def _default_arithmetic():
    yield
    determinism.set_deterministic(False)  # process-wide state: leave PyTorch's defaults to the next test


def linear_digits_model(seed: int = 0) -> robusteval.JointModel:
    torch.manual_seed(seed)
    return robusteval.wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10, (1, 8, 8), name="linear-digits")


def certify_options(**kwargs):
    options = dict(sigma=0.5, n0=20, n=300, alpha=0.01, n_images=4, batch_size=256, compile=False)
    options.update(kwargs)
    return options


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "batch_seconds", "device", "batch", "batch_records")} for r in records]


# --- resume across device strings ----------------------------------------------------------------------------
def test_an_attack_run_resumes_under_another_device_string_and_records_where_batches_ran(digits, tmp_path):
    model = linear_digits_model()
    common = dict(attack="fgsm", eps=[0.05], n=20, batch_size=10, large_eps_check=False, out=tmp_path / "run")
    first = robusteval.evaluate_attack(model, digits, device="cpu", **common)
    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert "device" not in config
    # Drop the second batch, as a kill would, and finish it under another spelling of the device.
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    (tmp_path / "run" / "samples.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (tmp_path / "run" / "summary.json").unlink()
    resumed = robusteval.evaluate_attack(model, digits, device="cpu:0", **common)
    assert resumed.summary()["curve"] == first.summary()["curve"]
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["device"] for r in records] == ["cpu"] * 10 + ["cpu:0"] * 10


def test_a_certify_run_resumes_under_another_device_string(digits, tmp_path):
    out = tmp_path / "run"
    full = robusteval.certify(linear_digits_model(), digits, device="cpu", out=out, **certify_options())
    assert "device_type" not in json.loads((out / CONFIG_FILE).read_text())
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text("\n".join(lines[:1]) + "\n")
    resumed = robusteval.certify(linear_digits_model(), digits, device="cpu:0", out=out, **certify_options())
    assert without_timing(resumed.records) == without_timing(full.records)
    assert {r["device"] for r in resumed.records[1:]} == {"cpu:0"}


def test_run_directories_made_before_the_device_left_the_configuration_still_resume(tmp_path):
    attack = {"kind": "attack", "seed": 0, "eps": [0.1]}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps({**attack, "device": "cuda:1"}))
    with RunDirectory(tmp_path / "a", attack) as run:
        assert run.resumed
    smoothing = {"kind": "certify", "seed": 0, "noise": "torch-normal-blocks-v1/1000/float32"}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / CONFIG_FILE).write_text(json.dumps({**smoothing, "device_type": "cpu"}))
    with RunDirectory(tmp_path / "s", smoothing) as run:
        assert run.resumed  # CPU-drawn noise is today's definition
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / CONFIG_FILE).write_text(json.dumps({**smoothing, "device_type": "cuda"}))
    with pytest.raises(RunConfigMismatch, match="device_type"):
        RunDirectory(tmp_path / "g", smoothing)  # its noise came from a CUDA generator: another stream


# --- the noise definition ---------------------------------------------------------------------------------
def reference_block(seed: int, index: int, stream: int, block: int, rows: int, shape) -> torch.Tensor:
    """The documented definition, computed independently of NoiseSource."""
    key = f"{seed}:{index}:{stream}:{block}".encode()
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
    return torch.randn((rows, *shape), generator=generator)


def test_noise_is_the_documented_cpu_definition_and_the_stream_of_earlier_runs():
    shape = (3, 32, 32)
    source = NoiseSource(0, shape, torch.device("cpu"), torch.float32)
    assert source.block == 1000  # 4 Mi values per block at most: 1,365 CIFAR draws, capped at 1,000
    out = torch.empty(1500, *shape)
    source.write(out, 17, Phase(ESTIMATION, 100_000), 250, 1750)
    expected = torch.cat([reference_block(0, 17, ESTIMATION, 0, 1000, shape)[250:],
                          reference_block(0, 17, ESTIMATION, 1, 1000, shape)[:750]])
    assert torch.equal(out, expected)
    # Values the sampler drew before this definition was written down (the committed runs' stream).
    assert out.flatten()[:3].tolist() == [-0.49762749671936035, 0.5418091416358948, 0.49534887075424194]
    assert float(out.double().sum()) == pytest.approx(-306.394921327269, abs=1e-9)


@pytest.mark.parametrize("batch", [1, 7, 64, 300, 1000])
def test_pass_noise_is_independent_of_batch_size_block_layout_and_staging(batch):
    """Passes of any size, drawn in place or through the staging buffers a GPU uses, give the same stream."""
    shape = (1, 4, 4)
    images = torch.zeros(3, *shape)
    phases = [Phase(0, 40), Phase(ESTIMATION, 250)]
    reference = torch.cat([torch.cat([reference_block(5, index, 0, 0, 40, shape),
                                      reference_block(5, index, ESTIMATION, 0, 250, shape)])
                           for index in (10, 11, 12)])
    for staged in (False, True):
        source = NoiseSource(5, shape, torch.device("cpu"), torch.float32)
        source.block = 1000  # whole phases per block here; the layout is the shape's (noise_block_size)
        passes = _NoisyPasses(images, [10, 11, 12], 1.0, phases, source, batch, staged=staged)
        total = len(reference)
        drawn = torch.cat([passes.fill(start, min(start + batch, total))[: min(batch, total - start)].clone()
                           for start in range(0, total, batch)])
        assert torch.equal(drawn, reference)


@cuda
def test_noise_blocks_drawn_for_the_gpu_equal_the_cpu_ones():
    shape = (3, 32, 32)
    cpu = torch.empty(2500, *shape)
    gpu = torch.empty(2500, *shape, device="cuda")
    for out, device in ((cpu, "cpu"), (gpu, "cuda")):
        NoiseSource(3, shape, torch.device(device), torch.float32).write(out, 42, Phase(ESTIMATION, 5000), 100, 2600)
    assert torch.equal(gpu.cpu(), cpu)
    # The passes a GPU run builds (pinned staging, asynchronous copies) hold the same noise.
    images = torch.rand(4, *shape)
    phases = [Phase(0, 100), Phase(ESTIMATION, 1000)]
    built = []
    for device in ("cpu", "cuda"):
        source = NoiseSource(3, shape, torch.device(device), torch.float32)
        passes = _NoisyPasses(images, [0, 1, 2, 3], 0.25, phases, source, 700)
        built.append(torch.cat([passes.fill(s, min(s + 700, 4400)).cpu().clone() for s in range(0, 4400, 700)]))
    assert torch.equal(built[0], built[1])


@cuda
def test_certify_on_cuda_counts_what_the_cpu_counts(digits):
    cpu = robusteval.certify(linear_digits_model(), digits, device="cpu", deterministic=True, **certify_options())
    gpu = robusteval.certify(linear_digits_model(), digits, device="cuda", deterministic=True, **certify_options())
    # Same noise, same inputs: only a float32 rounding difference at a decision boundary could move a count.
    for a, b in zip(cpu.records, gpu.records):
        assert abs(a["count"] - b["count"]) <= 1 and a["top_class"] == b["top_class"]
    assert {r["device"] for r in gpu.records} == {"cuda:0"}


SEQUENTIAL = dict(sigma=0.5, n0=20, method="sequential", radii=[0.25, 0.5], n_max=1500, alpha=0.01, n_images=6,
                  batch_size=256, compile=False)


def test_sequential_records_name_their_device(digits):
    result = robusteval.certify(linear_digits_model(), digits, device="cpu", **SEQUENTIAL)
    assert {r["device"] for r in result.records} == {"cpu"}


@cuda
def test_sequential_certify_on_cuda_draws_the_cpu_noise(digits):
    # The sequential sampler writes CERTIFY's NoiseSource blocks, drawn on the CPU: a GPU run sees the same noise.
    cpu = robusteval.certify(linear_digits_model(), digits, device="cpu", deterministic=True, **SEQUENTIAL)
    gpu = robusteval.certify(linear_digits_model(), digits, device="cuda", deterministic=True, **SEQUENTIAL)
    for a, b in zip(cpu.records, gpu.records):
        assert a["top_class"] == b["top_class"] and abs(a["count"] - b["count"]) <= 1
        assert abs(a["draws"] - b["draws"]) <= max(a["draws"], b["draws"]) // 2  # at most one look apart
    assert sum(a == b for a, b in zip(without_timing(cpu.records), without_timing(gpu.records))) >= 5
    assert {r["device"] for r in gpu.records} == {"cuda:0"}


@cuda
def test_attack_and_denoise_on_cuda_agree_with_the_cpu(digits):
    common = dict(attack="apgd-ce", eps=[0.1], n=40, batch_size=20, large_eps_check=False, deterministic=True)
    cpu = robusteval.evaluate_attack("standard", digits, device="cpu", **common).summary()
    gpu = robusteval.evaluate_attack("standard", digits, device="cuda", **common).summary()
    assert cpu["clean_accuracy"] == gpu["clean_accuracy"]
    assert abs(cpu["curve"][0]["robust_accuracy"] - gpu["curve"][0]["robust_accuracy"]) <= 2 / 40
    from robusteval.generative.denoising import evaluate_denoising

    cpu_psnr = evaluate_denoising("cdn", digits, sigmas=[0.25], n_images=8, device="cpu")["psnr"]
    gpu_psnr = evaluate_denoising("cdn", digits, sigmas=[0.25], n_images=8, device="cuda")["psnr"]
    assert gpu_psnr[0]["psnr"] == pytest.approx(cpu_psnr[0]["psnr"], abs=1e-3)


# --- generators of either device ---------------------------------------------------------------------------
def test_draws_come_from_the_generator_and_land_on_the_device():
    generator = torch.Generator().manual_seed(4)
    drawn = draws.randn((3, 5), generator, "cpu", torch.float64)
    assert torch.equal(drawn, torch.randn((3, 5), generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    assert draws.rand((2, 2), None, "meta").device.type == "meta"  # moved where it is used


@pytest.mark.parametrize("name", ["egc", "jem"])
def test_sample_with_a_cpu_generator_is_reproducible(name):
    model = robusteval.create_model(name, dataset="digits", device="cpu")
    first = model.sample(2, generator=torch.Generator().manual_seed(1))
    again = model.sample(2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and first.shape == (2, 1, 8, 8)


@cuda
@pytest.mark.parametrize("name", ["egc", "jem"])
def test_sample_accepts_a_cuda_generator_and_a_cpu_one_gives_the_cpu_images(name):
    gpu_model = robusteval.create_model(name, dataset="digits", device="cuda")
    images = gpu_model.sample(2, generator=torch.Generator(device="cuda").manual_seed(1))
    assert images.device.type == "cuda" and bool(((images >= 0) & (images <= 1)).all())
    cpu_model = robusteval.create_model(name, dataset="digits", device="cpu")
    cpu_images = cpu_model.sample(2, generator=torch.Generator().manual_seed(1))
    gpu_images = gpu_model.sample(2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu_images.cpu(), cpu_images, atol=1e-3, rtol=0)


# --- device selection ----------------------------------------------------------------------------------------
def test_cuda_n_becomes_the_current_device_and_a_missing_index_is_one_line(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(str(device)))
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1") and chosen == ["cuda:1"]
    with pytest.raises(devices.DeviceUnavailable) as error:
        devices.resolve_device("cuda:7")
    assert str(error.value) == "device 'cuda:7' does not exist: this machine has 2 GPU(s), cuda:0..cuda:1"
    assert chosen == ["cuda:1"]  # nothing set for a device that is not there


@cuda
def test_resolving_cuda_n_sets_the_current_device():
    last = torch.cuda.device_count() - 1
    try:
        devices.resolve_device(f"cuda:{last}")
        assert torch.cuda.current_device() == last
    finally:
        torch.cuda.set_device(0)


# --- deterministic mode --------------------------------------------------------------------------------------
def test_deterministic_option_switches_algorithms_and_tf32(digits):
    resolve(linear_digits_model(), JobOptions(dataset=digits, deterministic=True))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert determinism.gpu_notes(torch.device("cuda")) == []
    resolve(linear_digits_model(), JobOptions(dataset=digits))
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.allow_tf32
    assert determinism.gpu_notes(torch.device("cuda")) == [determinism.NONDETERMINISTIC_NOTE]
    assert determinism.gpu_notes(torch.device("cpu")) == []  # CPU arithmetic is deterministic anyway


def test_certify_summary_records_the_arithmetic(digits):
    result = robusteval.certify(linear_digits_model(), digits, device="cpu", deterministic=True, **certify_options())
    assert result.summary["deterministic"] is True and "notes" not in result.summary


@pytest.mark.parametrize("size, shape", [(1, (2, 5, 8, 8)), (2, (2, 5, 8, 8)), (2, (1, 3, 5, 7)), (1, (3, 3, 4))])
def test_the_pooling_is_adaptive_average_pooling_bit_for_bit_on_the_cpu(size, shape):
    x = torch.randn(shape)
    determinism.set_deterministic(True)
    assert torch.equal(determinism.AdaptiveAvgPool2d(size)(x), nn.AdaptiveAvgPool2d(size)(x))


@cuda
def test_the_pooling_is_deterministic_on_cuda_and_agrees_with_adaptive_pooling():
    determinism.set_deterministic(True)
    x = torch.randn(64, 32, 8, 8, device="cuda", requires_grad=True)
    pool = determinism.AdaptiveAvgPool2d(2)
    grads = []
    for _ in range(2):
        (grad,) = torch.autograd.grad((pool(x) * torch.arange(4.0, device="cuda").view(1, 1, 2, 2)).sum(), x)
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(pool(x), nn.AdaptiveAvgPool2d(2)(x.detach()).requires_grad_(False), rtol=1e-6,
                               atol=1e-6)


# --- the conditioned energy network without a host synchronisation ---------------------------------------------
def _old_forward(net, x, coordinate):
    """ConditionedEnergyNet.forward as it was: each distinct level embedded once via torch.unique."""
    import torch.nn.functional as F

    levels, index = torch.unique(coordinate, return_inverse=True)
    embedding = net.embedding(levels)
    h = net.project(F.silu(net.stem(x)).flatten(1))
    for block in net.blocks:
        h = block(h, embedding, index)
    return net.head(F.silu(h))


@pytest.mark.parametrize("name", ["cdn", "egc"])
def test_the_energy_network_gives_its_old_outputs_with_and_without_torch_unique(name, monkeypatch):
    model = robusteval.create_model(name, dataset="digits", device="cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=generator)
    random_sigmas = torch.rand(64, generator=generator) * 0.5
    shared = torch.full((64,), 0.25)
    mixed = torch.tensor([0.1, 0.3]).repeat(32)
    with torch.no_grad():
        for sigma in (random_sigmas, shared, mixed):
            captured = []
            monkeypatch.setattr(type(model.net), "forward", lambda net, a, c: captured.append((a, c)) or
                                _old_forward(net, a, c))
            old = model.logits(x, sigma)
            monkeypatch.undo()
            net_input, coordinate = captured[0]
            assert torch.equal(model.logits(x, sigma), old)  # on the CPU: the same bits as before
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the GPU's path, on the CPU
            per_sample = model.net(net_input, coordinate)
            monkeypatch.undo()
            torch.testing.assert_close(per_sample, _old_forward(model.net, net_input, coordinate), rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(model.logits(x, sigma), old)


@cuda
@pytest.mark.parametrize("name", ["cdn", "egc"])
def test_the_energy_network_on_cuda_agrees_with_the_cpu(name):
    cpu = robusteval.create_model(name, dataset="digits", device="cpu")
    gpu = robusteval.create_model(name, dataset="digits", device="cuda")
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 0.5
    determinism.set_deterministic(True)
    with torch.no_grad():
        torch.testing.assert_close(gpu.logits(x.cuda(), sigma.cuda()).cpu(), cpu.logits(x, sigma), rtol=1e-4,
                                   atol=1e-4)


# --- work sizes by device ------------------------------------------------------------------------------------
def test_cpu_sizes_are_unchanged_and_gpu_sizes_are_larger():
    from robusteval.core import work_sizes

    assert work_sizes.certify_batch("cpu", (3, 32, 32)) == 1000
    assert work_sizes.stacked_images("cpu") == 4096 and work_sizes.denoise_batch("cpu") == 100
    assert work_sizes.certify_batch("cuda", (1, 8, 8)) == 10_000
    assert work_sizes.certify_batch("cuda", (3, 224, 224)) == 1000  # 150,528 values per image: never below the CPU's
    assert work_sizes.stacked_images("cuda") > 4096 and work_sizes.denoise_batch("cuda") == 1000


def test_default_batch_sizes_follow_the_device(digits):
    from robusteval.generative.denoising import prepare_denoising
    from robusteval.smoothing.engine import SmoothingSettings, prepare_smoothing

    settings = SmoothingSettings("certify", sigma=0.5, n=100, alpha=0.01, n0=10)
    assert prepare_smoothing(linear_digits_model(), digits, settings, device="cpu").batch_size == 1000
    job = prepare_denoising("cdn", digits, sigmas=[0.25], n_images=4, device="cpu")
    assert job.batch_size == 100 and job.config["batch_size"] == 100


def test_blocks_drawn_by_several_threads_are_the_blocks_drawn_by_one():
    shape = (1, 4, 4)
    phase = Phase(ESTIMATION, 100)
    outputs = []
    for threads in (1, 3):
        source = NoiseSource(9, shape, torch.device("cpu"), torch.float32, threads=threads)
        source.block = 7  # 15 blocks, the last one short
        out = torch.empty(100, *shape)
        for start, stop in ((0, 3), (3, 40), (40, 41), (41, 100)):  # part-used blocks carried between writes
            source.write(out[start:stop], 2, phase, start, stop)
        outputs.append(out)
    expected = torch.cat([reference_block(9, 2, ESTIMATION, k, min(7, 100 - 7 * k), shape) for k in range(15)])
    assert torch.equal(outputs[0], expected) and torch.equal(outputs[1], expected)


def test_threads_write_into_an_inference_tensor_as_one_thread_does():
    # The sampler fills its passes under torch.inference_mode; the pool's threads must write there too.
    shape = (1, 4, 4)
    phase = Phase(ESTIMATION, 30)
    outputs = []
    for threads in (1, 2):
        source = NoiseSource(3, shape, torch.device("cpu"), torch.float32, threads=threads)
        source.block = 7
        with torch.inference_mode():
            out = torch.empty(30, *shape)
            source.write(out, 5, phase, 0, 30)
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])


# --- training on a GPU -----------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("name", ["standard", "pgd-at", "gaussian", "cdn", "dmae", "jem", "egc", "jdm", "gmmc"])
def test_every_recipe_trains_on_cuda(name, tmp_path):
    from robusteval.model_zoo.train_model import train_model

    result = train_model(name, epochs=1, seed=0, out=tmp_path / f"{name}.safetensors", progress=False,
                         device="cuda")
    assert result.record["train_device"].startswith("cuda: ") and result.record["command"].endswith("--device cuda")
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())
    assert result.model.device.type == "cpu"  # saved from the CPU; the record's figures were measured on the GPU
    if name == "standard":
        cpu = train_model(name, epochs=1, seed=0, out=tmp_path / "cpu.safetensors", progress=False)
        assert abs(result.record["metrics"]["test_accuracy"] - cpu.record["metrics"]["test_accuracy"]) <= 0.05
