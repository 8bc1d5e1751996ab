"""Training C-DeID-GAN: one plain loop, single process or torchrun / DistributedDataParallel.

    mri-deidentify train --data DIR_OR_BIDS --out DIR [--size 64] [--steps N] [--resume]
    torchrun --nproc_per_node 4 -m MRIDeIdentifyLib.train --data DIR --out DIR     # several GPUs or nodes

Each scan is preprocessed once into a cache (``OUT/cache``): its model-grid volume and dilated brain mask, built
with the engine's own headmask / brainmask / modelgrid so training sees what inference sees, and the face prior
fitted to the head's own skin (placement.fit_identity: identity weights and pose), kept as the skin's signed
distance on the cube. Every step augments one cached head per process (augment.py), builds the conditioning on
the augmented head with the same function inference uses (modelinputs), and takes one discriminator and one
generator step with the R-LSGAN losses. The checkpoint
holds both networks, their optimisers, the generator's EMA, the step and the configs; a step's randomness is a
function of (seed, step, rank), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import operator
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .augment import augment
from .settings import DEFAULT_FACETS, DEFAULT_MARGIN_MM, DEFAULT_ROTATIONS
from .devices import DEVICE_CHOICES, resolve_device
from .errors import PROG, OneLineParser
from .model import (
    Discriminator,
    Generator,
    ModelConfig,
    blend,
    discriminator_loss,
    gamma_pyramid,
    generator_loss,
    last_convolution,
    noise,
    pyramid,
    save_generator,
)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint.

    recon_weight: weight of an L1 term between the blended fake and the real head at every scale. The paper
        trains with the adversarial loss alone; with a few heads and a few hundred CPU steps that gives noise,
        while the L1 term gives an average head fitted to gamma's hull at once, which the adversarial term then
        sharpens. 0 = the paper's loss.
    adversarial: False = the generator alone on the L1 term, with no discriminator step (ESRGAN's
        PSNR-oriented pre-training: about 3x cheaper a step on CPU, and it learns the head's layers -- scalp,
        fat, bone -- from the hull before the adversarial term is asked to add realistic texture).
    exclude: scan file-name prefixes kept out of training (a held-out person to look at generalisation).
    init_from: checkpoint of a run at the same or a smaller size to start from (progressive training or a new
        phase): its generator blocks are reused, new finer blocks start as identity refinements, and the
        discriminator and optimisers start afresh. The checkpoint's phases are carried into the new run's.
    """

    data: str = ""
    out: str = "runs/cdeidgan"
    checkpoint: str = ""  # default: OUT/checkpoint.pt
    size: int = 64
    block: str = "dense"
    steps: int = 2000
    batch: int = 1  # per process
    lr: float = 2e-3
    betas: Tuple[float, float] = (0.0, 0.99)
    ema: float = 0.999
    recon_weight: float = 10.0
    adversarial: bool = True
    augment: bool = True
    rotations: int = DEFAULT_ROTATIONS
    facets: int = DEFAULT_FACETS
    margin_mm: float = DEFAULT_MARGIN_MM
    exclude: Tuple[str, ...] = ()
    seed: int = 0
    log_every: int = 10
    image_every: int = 100
    checkpoint_minutes: float = 5.0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    init_from: str = ""
    minutes: float = 0.0  # stop (with a checkpoint) after this many minutes of this invocation; 0 = no limit


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Head:
    """One cached scan on the model grid: ``volume`` float32 (S, S, S) normalised, ``brain`` bool (S, S, S),
    ``skin`` float32 (S, S, S): the face prior fitted to this head, as a signed distance in mm."""

    name: str
    volume: np.ndarray
    brain: np.ndarray
    skin: np.ndarray


def preprocess(
    path: Path,
    size: int,
    margin_mm: float,
    device: torch.device | str = "cpu",
    brain_cache: Optional[Path] = None,
    series: Optional[str] = None,
) -> Head:
    """Read a scan and put it on its model grid exactly as the ``remodel`` method does (brain dilated by the margin).

    ``brain_cache``: an .npz file keeping the dilated brain mask on the scan's own grid, so that building the
    cache for another model size does not run the brain extractor again. ``series``: the DICOM series of a
    folder holding several.
    """
    from .scans import Scan
    from .brainmask import dilate_mm, extract_brain_mask
    from .headmask import head_mask, head_threshold
    from .modelgrid import ModelGrid
    from .reader import read_volume

    image = read_volume(path, series).image
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    head = head_mask(image, head_threshold(image), array=array)
    if brain_cache is not None and brain_cache.exists():
        with np.load(brain_cache) as data:
            brain = np.unpackbits(data["bits"], count=array.size).reshape(array.shape).astype(bool)
    else:
        brain = dilate_mm(extract_brain_mask(image, device), image.GetSpacing()[::-1], margin_mm)
        if brain_cache is not None:
            np.savez_compressed(brain_cache, bits=np.packbits(brain))
    grid = ModelGrid.around(image, head, brain, size=size, array=array)
    volume, cube_brain = grid.to_model(image), grid.mask_to_model(brain, image)
    skin, fit = fit_skin(image, head, grid, volume, cube_brain)
    print(f"  face prior fitted: median distance {fit:.1f} mm", file=sys.stderr)
    return Head(Scan(path, series).name, volume, cube_brain, skin)


def fit_skin(
    image: sitk.Image, head: np.ndarray, grid, volume: np.ndarray, brain: np.ndarray
) -> Tuple[np.ndarray, float]:
    """The face prior fitted to a training head's own skin (pose and identity weights, on the part of the face
    in its field of view), as the signed distance (mm) the generator is conditioned on, and the fit's median
    distance (mm). The same placement, skin and scalp rules as ``remodel`` apply, so the generator learns on
    the kind of surface it is given at inference."""
    from .faceprior import load_face_prior
    from .modelinputs import model_inputs
    from .placement import brain_distance, cube_skin, field_of_view, fit_identity, skin_points

    prior = load_face_prior()
    gamma = model_inputs(volume, brain, seed=0).gamma.numpy()
    _, vertices, error = fit_identity(prior, skin_points(image, head), gamma, grid, field_of_view(image, grid))
    return cube_skin(prior, vertices, grid, brain_distance(gamma, grid)), error


def load_heads(config: TrainConfig, device: torch.device, rank: int) -> List[Head]:
    """The training heads, preprocessing any scan not yet in the cache (rank 0 builds it, the others wait)."""
    from .scans import find_scans

    scans, _ = find_scans(Path(config.data))
    scans = [s for s in scans if not s.name.startswith(tuple(config.exclude))]
    if not scans:
        raise SystemExit(f"no training scans under {config.data} (after excluding {config.exclude})")
    cache = Path(config.out) / "cache"
    files = [cache / f"{s.name}.s{config.size}.m{config.margin_mm:g}.face.npz" for s in scans]
    if rank == 0:
        cache.mkdir(parents=True, exist_ok=True)
        for scan, file in zip(scans, files):
            if file.exists() or file.with_suffix(".skip").exists():
                continue
            print(f"preprocessing {scan.name}", file=sys.stderr)
            try:
                head = preprocess(
                    scan.path,
                    config.size,
                    config.margin_mm,
                    device,
                    cache / f"{scan.name}.brain.m{config.margin_mm:g}.npz",
                    scan.series,
                )
            except Exception as error:  # one unusable scan must not stop a run over a whole dataset
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
                print(f"skipping {scan.name}: {reason}", file=sys.stderr)
                file.with_suffix(".skip").write_text(reason + "\n")
                continue
            tmp = file.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, volume=head.volume, brain=head.brain, skin=head.skin)
            tmp.replace(file)
    if dist.is_initialized():
        dist.barrier()
    heads = []
    for file in files:
        if not file.exists():
            continue
        with np.load(file) as data:
            heads.append(Head(file.name.split(".s")[0], data["volume"], data["brain"], data["skin"]))
    return heads


@dataclass
class Batch:
    """The inputs of one training step. Each list is a pyramid, coarsest scale (4³) first, of (batch, channels,
    S, S, S) tensors on the model grid (KJI): ``reals`` the heads (1 channel, normalised units), ``fractions``
    the brain's share of each voxel (1 channel, 0..1), ``gammas`` the conditioning (modelinputs.condition);
    ``noise`` is g_0, (batch, 1, 4, 4, 4)."""

    reals: List[torch.Tensor]
    fractions: List[torch.Tensor]
    gammas: List[torch.Tensor]
    noise: torch.Tensor


def make_batch(
    heads: List[Head],
    config: TrainConfig,
    model_config: ModelConfig,
    generator: torch.Generator,
    device: torch.device | str,
) -> Batch:
    """``config.batch`` random heads, augmented, with the conditioning built on each exactly as inference builds
    it (modelinputs): the inputs of :func:`train_step`."""
    from .modelinputs import condition, model_inputs

    volumes, brains, gammas = [], [], []
    for _ in range(config.batch):
        head = heads[int(torch.randint(len(heads), (1,), generator=generator))]
        volume = torch.from_numpy(head.volume)
        brain = torch.from_numpy(head.brain)
        skin = torch.from_numpy(head.skin)
        if config.augment:
            volume, brain, skin = augment(volume, brain, skin, generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        inputs = model_inputs(volume, brain, seed=seed, rotations=config.rotations, facets=config.facets)
        gammas.append(condition(inputs.gamma, skin))
        volumes.append(volume)
        brains.append(brain)
    x = torch.stack(volumes)[:, None].to(device)
    b = torch.stack(brains)[:, None].to(device=device, dtype=torch.float32)
    gamma = torch.stack(gammas).to(device)
    n = model_config.n_blocks
    return Batch(
        reals=pyramid(x, n),
        fractions=pyramid(b, n),
        gammas=gamma_pyramid(gamma, n, generator),
        noise=noise(config.batch, generator, device),
    )


# ---------------------------------------------------------------------------------------------------- step


def train_step(
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    batch: Batch,
    recon_weight: float,
    autocast: Callable[[], ContextManager[object]] = nullcontext,
    adversarial: bool = True,
) -> Dict[str, float]:
    """One discriminator step then one generator step on ``batch`` (the generator step alone when not
    ``adversarial``); returns the losses.

    ``generator``/``discriminator`` may be DDP-wrapped. The discriminator sees reals and fakes in one batch (one
    forward, one gradient all-reduce); in the generator step it runs unwrapped with frozen weights, since only
    the generator's gradients are wanted there.
    """
    reals, gammas, fractions = batch.reals, batch.gammas, batch.fractions
    with autocast():
        fakes = blend(generator(gammas, batch.noise), gammas, fractions)
    losses: Dict[str, float] = {}
    if adversarial:
        both_gammas = [torch.cat([g, g]) for g in gammas]
        with autocast():
            scores = discriminator([torch.cat([r, f.detach()]) for r, f in zip(reals, fakes)], both_gammas)
            real_scores, fake_scores = scores.float().chunk(2)
            loss_d = discriminator_loss(real_scores, fake_scores)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        critic = discriminator.module if isinstance(discriminator, DistributedDataParallel) else discriminator
        critic.requires_grad_(False)
        with autocast():
            scores = critic([torch.cat([r, f]) for r, f in zip(reals, fakes)], both_gammas)
            real_scores, fake_scores = scores.float().chunk(2)
            loss_adversarial = generator_loss(real_scores, fake_scores)
        losses = {"loss_d": loss_d.item(), "loss_g": loss_adversarial.item()}
    recon: torch.Tensor = functools.reduce(operator.add, [F.l1_loss(f.float(), r) for f, r in zip(fakes, reals)])
    recon = recon / len(reals)
    loss_g = recon_weight * recon
    if adversarial:
        loss_g = loss_g + loss_adversarial
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    if adversarial:
        critic.requires_grad_(True)
    losses["recon"] = recon.item()
    return losses


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the weights; the decay ramps up over the first steps so that short runs are not stuck at init."""
    decay = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for buffer, source in zip(ema.buffers(), model.buffers()):
        buffer.copy_(source)


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    from adamp import AdamP

    return AdamP(params, lr=config.lr, betas=tuple(config.betas))


def grow(generator: Generator, g_ema: Generator, smaller: dict) -> None:
    """Start ``generator`` and ``g_ema`` from a checkpoint of a smaller size (same widths per scale).

    The coarse blocks are copied; each new finer block's last convolution is zeroed, so the grown generator
    starts as the smaller one's output upsampled by nearest neighbour and learns only the added detail.
    """
    old = ModelConfig.from_dict(smaller["model_config"])
    if generator.config.g_widths[: old.n_blocks] != old.g_widths or generator.config.block != old.block:
        raise SystemExit("--init-from: the smaller model's blocks do not match this model's coarse blocks")
    for net, key in ((generator, "g"), (g_ema, "g_ema")):
        net.load_state_dict(_widen_inputs(smaller[key], net.state_dict()), strict=False)
        with torch.no_grad():
            for block in net.blocks[old.n_blocks :]:
                last = last_convolution(block)
                last.weight.zero_()
                if last.bias is not None:
                    last.bias.zero_()


def _widen_inputs(old: dict, new: dict) -> dict:
    """``old`` weights with every input convolution that this model gives more input channels (a conditioning
    channel added since, such as the face prior's skin) widened by zeros: the grown model starts as the old one,
    blind to the new channel, and learns to use it."""
    widened = {}
    for key, value in old.items():
        target = new.get(key)
        if (
            target is not None
            and value.dim() == 5
            and value.shape[1] < target.shape[1]
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            value = torch.cat(
                [value, value.new_zeros((value.shape[0], target.shape[1] - value.shape[1]) + tuple(value.shape[2:]))], 1
            )
        widened[key] = value
    return widened


# ---------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a run killed mid-write keeps its previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint holds tensors, numbers and strings only, so nothing is unpickled.
    return torch.load(path, map_location="cpu", weights_only=True)


def export(checkpoint: Path, weights: Path) -> str:
    """Write the checkpoint's EMA generator as safetensors + JSON (with the run's figures); returns the sha256."""
    state = load_checkpoint(checkpoint)
    model_config = ModelConfig.from_dict(state["model_config"])
    generator = Generator(model_config)
    generator.load_state_dict(state["g_ema"])
    phases = list(state.get("phases", [])) + [phase_summary(state)]
    extra = {
        "training": {
            "steps": sum(p["steps"] for p in phases),
            "wall_seconds": round(sum(p["wall_seconds"] for p in phases), 1),
            "hardware": state.get("hardware", ""),
            "config": state["train_config"],
            "phases": phases,
        }
    }
    return save_generator(generator, weights, extra)


def phase_summary(state: dict) -> dict:
    """One training run (phase) of a checkpoint, as the model card lists it."""
    config = state["train_config"]
    history = state["history"]
    return {
        "size": state["model_config"]["size"],
        "steps": state["step"],
        "wall_seconds": round(state["wall_seconds"], 1),
        "hardware": state.get("hardware", ""),
        "adversarial": config.get("adversarial", True),
        "recon_weight": config["recon_weight"],
        "lr": config["lr"],
        "betas": list(config["betas"]),
        "last_losses": history[-1] if history else {},
    }


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[List[str]]) -> Tuple[TrainConfig, argparse.Namespace]:
    defaults = TrainConfig()
    parser = OneLineParser(prog=f"{PROG} train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=False, default="", help="folder or BIDS dataset of head scans")
    parser.add_argument("--out", default=defaults.out, help="run folder: cache, TensorBoard events, checkpoint")
    parser.add_argument("--checkpoint", default="", help="checkpoint file (default OUT/checkpoint.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument(
        "--export",
        metavar="WEIGHTS",
        help="write the checkpoint's EMA generator to WEIGHTS (.safetensors, with a .json beside it) and exit",
    )
    parser.add_argument("--exclude", nargs="*", default=[], help="scan name prefixes kept out of training")
    parser.add_argument(
        "--betas",
        nargs=2,
        type=float,
        default=list(defaults.betas),
        metavar=("B1", "B2"),
        help="Adam(P) betas (default: the paper's 0 0.99)",
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "out", "checkpoint", "exclude", "betas"):
            continue
        kind = type(getattr(defaults, f.name))
        if kind is bool:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                action=argparse.BooleanOptionalAction,
                default=getattr(defaults, f.name),
            )
        else:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=kind,
                default=getattr(defaults, f.name),
                choices=DEVICE_CHOICES if f.name == "device" else None,
            )
    args = parser.parse_args(argv)
    if not args.data and not args.export:
        parser.error("--data is required for training")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values["exclude"] = tuple(args.exclude)
    values["betas"] = tuple(args.betas)
    return TrainConfig(**values), args


def main(argv: Optional[List[str]] = None) -> int:
    config, args = parse_args(argv)
    checkpoint_path = Path(config.checkpoint or Path(config.out) / "checkpoint.pt")
    if args.export:
        print(export(checkpoint_path, Path(args.export)))
        return 0

    # torchrun sets these; a plain run is rank 0 of 1.
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config.threads:
        torch.set_num_threads(config.threads)
    master = rank == 0

    state = None
    if args.resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        saved = dict(state["train_config"])
        # Resuming continues the saved run; only the stopping point and the bookkeeping may change.
        for key in (
            "steps",
            "minutes",
            "log_every",
            "image_every",
            "checkpoint_minutes",
            "device",
            "threads",
            "data",
            "out",
            "checkpoint",
        ):
            saved[key] = getattr(config, key)
        saved["betas"] = tuple(saved["betas"])
        saved["exclude"] = tuple(saved["exclude"])
        config = TrainConfig(**saved)
        model_config = ModelConfig.from_dict(state["model_config"])
    else:
        model_config = ModelConfig(size=config.size, block=config.block)

    torch.manual_seed(config.seed)
    heads = load_heads(config, device, rank)
    generator, discriminator = Generator(model_config).to(device), Discriminator(model_config).to(device)
    g_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    opt_g, opt_d = make_optimizer(generator.parameters(), config), make_optimizer(discriminator.parameters(), config)
    step, wall, history, phases = 0, 0.0, [], []
    if state is not None:
        generator.load_state_dict(state["g"])
        discriminator.load_state_dict(state["d"])
        g_ema.load_state_dict(state["g_ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step, wall, history = state["step"], state["wall_seconds"], list(state["history"])
        phases = list(state.get("phases", []))
    elif config.init_from:
        source = load_checkpoint(Path(config.init_from))
        grow(generator, g_ema, source)
        phases = list(source.get("phases", [])) + [phase_summary(source)]
    g_train: torch.nn.Module = generator
    d_train: torch.nn.Module = discriminator
    if ddp:
        ids = [local_rank] if device.type == "cuda" else None
        g_train = DistributedDataParallel(generator, device_ids=ids)
        d_train = DistributedDataParallel(discriminator, device_ids=ids)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    writer = None
    if master:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(config.out) / "tensorboard" / f"s{config.size}"), purge_step=step or None)
        print(f"{len(heads)} training heads: {', '.join(h.name for h in heads)}", file=sys.stderr)
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=step, disable=not master, dynamic_ncols=True)

    def checkpoint() -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "g": generator.state_dict(),
                "d": discriminator.state_dict(),
                "g_ema": g_ema.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "step": step,
                "wall_seconds": wall,
                "history": history,
                "phases": phases,
                "model_config": model_config.to_dict(),
                "train_config": dataclasses.asdict(config),
                "hardware": _hardware(device, ddp),
            },
        )

    last_save = invoked = time.time()
    running: Dict[str, float] = {}
    window = 0  # steps summed in ``running`` (fewer than log_every right after a resume)
    while step < config.steps:
        start = time.time()
        # A step's randomness depends only on (seed, step, rank): exact resume without saving RNG states.
        rng = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009 + rank)
        batch = make_batch(heads, config, model_config, rng, device)
        losses = train_step(g_train, d_train, opt_g, opt_d, batch, config.recon_weight, autocast, config.adversarial)
        update_ema(g_ema, generator, config.ema, step)
        step += 1
        wall += time.time() - start
        for key, value in losses.items():
            running[key] = running.get(key, 0.0) + value
        window += 1
        bar.update(1)
        if writer is not None and (step % config.log_every == 0 or step == config.steps):
            means = {k: v / window for k, v in running.items()}
            history.append({"step": step, "wall_seconds": round(wall, 1), **{k: round(v, 5) for k, v in means.items()}})
            for key, value in means.items():
                writer.add_scalar(f"loss/{key}", value, step)
            bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
        if step % config.log_every == 0:
            running, window = {}, 0
        if writer is not None and (step % config.image_every == 0 or step == 1):
            writer.add_image("mid-slices (real | fake | EMA fake)", _mid_slices(batch, generator, g_ema), step)
        out_of_time = config.minutes > 0 and time.time() - invoked > 60 * config.minutes
        if ddp and config.minutes > 0:
            # Every rank must stop at the same step, or the others wait forever in the next all-reduce.
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if out_of_time:
            break
        if master and time.time() - last_save > 60 * config.checkpoint_minutes:
            checkpoint()
            last_save = time.time()
    if master:
        checkpoint()
    bar.close()
    if writer is not None:
        writer.close()
    if ddp:
        dist.destroy_process_group()
    return 0


@torch.no_grad()
def _mid_slices(batch: Batch, generator: torch.nn.Module, g_ema: torch.nn.Module) -> torch.Tensor:
    """(1, H, W) image: the first sample's three mid-slices, real over blended fake over blended EMA fake."""
    gammas, fractions = batch.gammas, batch.fractions
    rows = [batch.reals[-1][0, 0]]
    for net in (generator, g_ema):
        rows.append(blend(net(gammas, batch.noise), gammas, fractions)[-1][0, 0].float())
    tiles = []
    for volume in rows:
        n = volume.shape[0] // 2
        # Flip so the superior side and the face point up/left as radiologists view them.
        tiles.append(torch.cat([volume[n].flip(0), volume[:, n].flip(0), volume[:, :, n].flip(0)], 1))
    return torch.cat(tiles, 0).clamp(0, 1.2).div(1.2)[None].cpu()


def _hardware(device: torch.device, ddp: bool) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"CPU, {torch.get_num_threads()} torch threads"
    return f"{world} x {what}" if ddp else what


if __name__ == "__main__":
    sys.exit(main())
