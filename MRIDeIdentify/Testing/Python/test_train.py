"""Training (prepare.py, train.py): one step, a short overfit on a real prepared head, DDP equivalence, exact
resume, growing, export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from MRIDeIdentifyLib import train
from MRIDeIdentifyLib.prepare import Head, preprocess
from MRIDeIdentifyLib.model import Discriminator, Generator, ModelConfig, blend, load_generator, noise


def _ball(size: int, radius: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    axis = np.arange(size) - (size - 1) / 2
    k, j, i = np.meshgrid(axis, axis, axis, indexing="ij")
    return ((k - centre[0] * size) ** 2 + (j - centre[1] * size) ** 2 + (i - centre[2] * size) ** 2) <= (
        radius * size
    ) ** 2


def _synthetic_head(size: int, name: str = "ball") -> Head:
    """A head-like phantom on the model grid: scalp shell 0.6, skull gap 0.1, brain 1.0, a 'nose' bump."""
    head = _ball(size, 0.42) | _ball(size, 0.12, (0.0, -0.38, 0.0))
    brain = _ball(size, 0.28)
    volume = np.where(head, 0.6, 0.0) - 0.5 * (_ball(size, 0.32) & ~brain) + np.where(brain, 0.4, 0.0)
    # The face-prior skin channel: the scalp ball's signed distance in mm on a 256 mm cube.
    axis = (np.arange(size) - (size - 1) / 2) * (256.0 / size)
    k, j, i = np.meshgrid(axis, axis, axis, indexing="ij")
    skin = np.sqrt(k**2 + j**2 + i**2) - 0.42 * 256.0
    return Head(name, volume.astype(np.float32), brain, skin.astype(np.float32))


def _models(size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(size=size)
    return config, Generator(config), Discriminator(config)


@pytest.mark.parametrize("size", [16, 32])
def test_one_step_gives_finite_losses_and_changes_every_weight(size):
    config = train.TrainConfig(size=size, rotations=4)
    model_config, g, d = _models(size)
    before = (
        {n: p.detach().clone() for n, p in g.named_parameters()},
        {n: p.detach().clone() for n, p in d.named_parameters()},
    )
    opt_g, opt_d = train.make_optimizer(g.parameters(), config), train.make_optimizer(d.parameters(), config)
    batch = train.make_batch([_synthetic_head(size)], config, model_config, torch.Generator().manual_seed(0), "cpu")
    losses = train.train_step(g, d, opt_g, opt_d, batch, config.recon_weight)
    assert set(losses) == {"loss_d", "loss_g", "recon"}
    assert all(np.isfinite(v) for v in losses.values())
    for net, old in zip((g, d), before):
        for name, value in net.named_parameters():
            assert not torch.equal(value, old[name]), f"{type(net).__name__}.{name} did not change"


def test_l1_pretraining_step_leaves_the_discriminator_alone():
    config = train.TrainConfig(size=16, rotations=4, adversarial=False)
    model_config, g, d = _models(16)
    g_before = {n: p.detach().clone() for n, p in g.named_parameters()}
    d_before = {n: p.detach().clone() for n, p in d.state_dict().items()}
    opt_g, opt_d = train.make_optimizer(g.parameters(), config), train.make_optimizer(d.parameters(), config)
    batch = train.make_batch([_synthetic_head(16)], config, model_config, torch.Generator().manual_seed(0), "cpu")
    losses = train.train_step(g, d, opt_g, opt_d, batch, config.recon_weight, adversarial=False)
    assert set(losses) == {"recon"} and np.isfinite(losses["recon"])
    assert all(not torch.equal(value, g_before[name]) for name, value in g.named_parameters())
    assert all(torch.equal(value, d_before[name]) for name, value in d.state_dict().items())
    assert not opt_d.state, "no discriminator step was taken"


def _head_error(generator: Generator, batch: train.Batch) -> float:
    """Mean absolute error of the blended fake against the real head at full scale, outside the brain."""
    with torch.no_grad():
        fake = blend(generator(batch.gammas, batch.noise), batch.gammas, batch.fractions)[-1]
    outside = batch.fractions[-1] < 0.5
    return float((fake - batch.reals[-1]).abs()[outside].mean())


def test_short_overfit_on_one_real_head_lowers_the_generator_error(head_path):
    size = 16
    head = preprocess(head_path, size, margin_mm=3.0)
    config = train.TrainConfig(size=size, augment=False, rotations=4)
    model_config, g, d = _models(size)
    opt_g, opt_d = train.make_optimizer(g.parameters(), config), train.make_optimizer(d.parameters(), config)
    probe = train.make_batch([head], config, model_config, torch.Generator().manual_seed(123), "cpu")
    start = _head_error(g, probe)
    for step in range(40):
        batch = train.make_batch([head], config, model_config, torch.Generator().manual_seed(step), "cpu")
        train.train_step(g, d, opt_g, opt_d, batch, config.recon_weight)
    end = _head_error(g, probe)
    assert end < 0.6 * start, (start, end)


def _sgd(net: torch.nn.Module) -> torch.optim.Optimizer:
    # Plain SGD makes the update proportional to the gradient: Adam's first step is ~lr * sign(grad), which turns
    # float rounding in near-zero gradients (summed in another order by the all-reduce) into +-lr differences.
    return torch.optim.SGD(net.parameters(), lr=0.1)


def _ddp_worker(rank: int, init_file: str, batch: train.Batch, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    config = train.TrainConfig(size=16)
    _, g, d = _models(16)
    ddp_g = torch.nn.parallel.DistributedDataParallel(g)
    ddp_d = torch.nn.parallel.DistributedDataParallel(d)
    opt_g, opt_d = _sgd(g), _sgd(d)
    mine = train.Batch(
        reals=[t[rank : rank + 1] for t in batch.reals],
        fractions=[t[rank : rank + 1] for t in batch.fractions],
        gammas=[t[rank : rank + 1] for t in batch.gammas],
        noise=batch.noise[rank : rank + 1],
    )
    train.train_step(ddp_g, ddp_d, opt_g, opt_d, mine, config.recon_weight)
    if rank == 0:
        torch.save({"g": g.state_dict(), "d": d.state_dict()}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_ddp_step_equals_the_single_process_step(tmp_path):
    config = train.TrainConfig(size=16, batch=2, rotations=4)
    model_config, g, d = _models(16)
    heads = [
        _synthetic_head(16, "a"),
        Head("b", np.flip(_synthetic_head(16).volume, 1).copy(), _synthetic_head(16).brain, _synthetic_head(16).skin),
    ]
    batch = train.make_batch(heads, config, model_config, torch.Generator().manual_seed(5), "cpu")
    opt_g, opt_d = _sgd(g), _sgd(d)
    train.train_step(g, d, opt_g, opt_d, batch, config.recon_weight)

    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), batch, str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    for net, key in ((g, "g"), (d, "d")):
        for name, value in net.state_dict().items():
            torch.testing.assert_close(ddp[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


def _dataset(tmp_path: Path, size: int) -> Path:
    """Two tiny scan files and their cache entries, so that main() runs without the brain extractor."""
    data = tmp_path / "data"
    cache = tmp_path / "run" / "cache"
    data.mkdir()
    cache.mkdir(parents=True)
    for name, flip in (("sub-a_T1w", False), ("sub-b_T1w", True)):
        head = _synthetic_head(size, name)
        volume = np.flip(head.volume, 2).copy() if flip else head.volume
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(data / f"{name}.nii.gz"))
        np.savez_compressed(cache / f"{name}.s{size}.m3.face.npz", volume=volume, brain=head.brain, skin=head.skin)
    return data


def _tiny(data: Path, *extra: str) -> List[str]:
    """``train`` arguments for the phantoms of :func:`_dataset`: 16³, one thread, four hull rotations."""
    return ["--data", str(data), "--size", "16", "--threads", "1", "--rotations", "4", *extra]


def _copy_cache(source: Path, target: Path) -> None:
    """Give the run folder ``target`` the preprocessed heads of ``source`` (no brain extractor, no fit)."""
    (target / "cache").mkdir(parents=True)
    for file in (source / "cache").iterdir():
        (target / "cache" / file.name).write_bytes(file.read_bytes())


def test_main_resumes_exactly_logs_and_exports(tmp_path):
    data = _dataset(tmp_path, 16)
    common = _tiny(data, "--log-every", "1", "--image-every", "2")
    run = tmp_path / "run"
    assert train.main(common + ["--out", str(run), "--steps", "2"]) == 0
    assert train.main(common + ["--out", str(run), "--steps", "3", "--resume"]) == 0
    straight = tmp_path / "straight"
    _copy_cache(run, straight)
    assert train.main(common + ["--out", str(straight), "--steps", "3"]) == 0

    resumed = train.load_checkpoint(run / "checkpoint.pt")
    uninterrupted = train.load_checkpoint(straight / "checkpoint.pt")
    assert resumed["step"] == uninterrupted["step"] == 3
    for key in ("g", "d", "g_ema"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3]
    assert list((run / "tensorboard" / "s16").glob("events.out.tfevents.*"))

    weights = tmp_path / "g.safetensors"
    assert train.main(["--out", str(run), "--export", str(weights)]) == 0
    generator, config, _ = load_generator(weights)
    assert config.size == 16
    assert torch.equal(generator.state_dict()["blocks.0.body.0.weight"], resumed["g_ema"]["blocks.0.body.0.weight"])

    # A second phase (L1 pre-training) started from this run: the model card lists both phases.
    phase2 = tmp_path / "phase2"
    _copy_cache(run, phase2)
    assert (
        train.main(
            common
            + [
                "--out",
                str(phase2),
                "--steps",
                "2",
                "--init-from",
                str(run / "checkpoint.pt"),
                "--no-adversarial",
                "--betas",
                "0.9",
                "0.99",
            ]
        )
        == 0
    )
    second = train.load_checkpoint(phase2 / "checkpoint.pt")
    assert list(second["train_config"]["betas"]) == [0.9, 0.99]
    assert set(second["history"][-1]) == {"step", "wall_seconds", "recon"}
    assert train.main(["--out", str(phase2), "--export", str(weights)]) == 0
    phases = json.loads(weights.with_suffix(".json").read_text())["training"]["phases"]
    assert [(p["steps"], p["adversarial"]) for p in phases] == [(3, True), (2, False)]
    assert json.loads(weights.with_suffix(".json").read_text())["training"]["steps"] == 5


def test_main_runs_under_torchrun_with_two_gloo_processes(tmp_path):
    """What a cluster user runs, on CPU: torchrun sets RANK/WORLD_SIZE, main() joins the gloo group, both ranks
    pass the cache barrier and stop at the same step, and rank 0 writes the checkpoint."""
    import subprocess
    import sys

    data = _dataset(tmp_path, 16)
    run = tmp_path / "run"  # holds the cache made by _dataset: no brain extractor on the phantoms
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "MRIDeIdentifyLib.train",
            *_tiny(data, "--out", str(run), "--steps", "3", "--log-every", "1", "--image-every", "100"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = train.load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 3 and [h["step"] for h in state["history"]] == [1, 2, 3]
    assert state["hardware"].startswith("2 x CPU")
    assert all(np.isfinite(v) for h in state["history"] for k, v in h.items() if k != "step")


def test_the_first_log_after_a_resume_averages_only_the_steps_it_saw(tmp_path):
    """Resumed at step 1 with --log-every 2, the entry at step 2 covers step 2 alone: it must equal the
    uninterrupted run's per-step entry (a resume is exact), not half of it."""
    data = _dataset(tmp_path, 16)
    common = _tiny(data, "--image-every", "100")
    every_step = tmp_path / "every"
    _copy_cache(tmp_path / "run", every_step)
    assert train.main(common + ["--out", str(every_step), "--steps", "2", "--log-every", "1"]) == 0
    paired = tmp_path / "paired"
    _copy_cache(every_step, paired)
    assert train.main(common + ["--out", str(paired), "--steps", "1", "--log-every", "2"]) == 0
    assert train.main(common + ["--out", str(paired), "--steps", "2", "--log-every", "2", "--resume"]) == 0
    expected = train.load_checkpoint(every_step / "checkpoint.pt")["history"][-1]
    got = train.load_checkpoint(paired / "checkpoint.pt")["history"][-1]
    assert got["step"] == expected["step"] == 2
    for key in ("loss_d", "loss_g", "recon"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key


def test_grow_starts_from_the_smaller_generator_upsampled():
    small_config, small, _ = _models(16)
    state = {"model_config": small_config.to_dict(), "g": small.state_dict(), "g_ema": small.state_dict()}
    big = Generator(ModelConfig(size=32))
    big_ema = Generator(ModelConfig(size=32))
    train.grow(big, big_ema, state)
    gammas16 = [torch.rand(1, 4, s, s, s).round() for s in small_config.scales()]
    gammas32 = gammas16 + [torch.rand(1, 4, 32, 32, 32).round()]
    z = noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = F.interpolate(small(gammas16, z)[-1], scale_factor=2.0, mode="nearest")
        assert torch.equal(big(gammas32, z)[-1], expected)
        assert torch.equal(big_ema(gammas32, z)[-1], expected)
