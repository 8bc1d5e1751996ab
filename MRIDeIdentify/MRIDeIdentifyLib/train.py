"""Training C-DeID-GAN: one plain loop, single process or torchrun / DistributedDataParallel.

    mri-deidentify train --data DIR_OR_BIDS --out DIR [--size 64] [--steps N] [--resume]
    torchrun --nproc_per_node 4 -m MRIDeIdentifyLib.train --data DIR --out DIR     # several GPUs or nodes

Each scan is prepared once into a cache (``OUT/cache``, prepare.py): its head on the model grid as inference puts
it, with the face prior fitted to its own skin. Every step augments one cached head per process (augment.py),
builds the conditioning on the augmented head with the same function inference uses (modelinputs), and takes one
discriminator and one generator step with the R-LSGAN losses. The checkpoint holds both networks, their
optimisers, the generator's EMA, the step and the configs; a step's randomness is a function of (seed, step,
rank), so a resumed run continues exactly as an uninterrupted one would.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .augment import augment
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
from .prepare import Head, load_heads
from .settings import DEFAULT_FACETS, DEFAULT_MARGIN_MM, DEFAULT_ROTATIONS


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


# ---------------------------------------------------------------------------------------------------- batches


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
    """AdamP (the paper's optimiser) over ``params`` with the config's learning rate and betas."""
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
    """A checkpoint as :meth:`Run.state` wrote it, its tensors on the CPU."""
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


# ---------------------------------------------------------------------------------------------------- command line


def parse_args(argv: Optional[List[str]]) -> Tuple[TrainConfig, argparse.Namespace]:
    """The command line: a ``--`` option for every TrainConfig field, plus ``--resume`` and ``--export``; the
    TrainConfig and the parsed arguments."""
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


# ---------------------------------------------------------------------------------------------------- a run

# Resuming continues the saved run; only the stopping point and the bookkeeping may change.
RESUME_MAY_CHANGE = (
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
)


def resumed_config(config: TrainConfig, state: dict) -> TrainConfig:
    """The configuration saved in the checkpoint ``state``, with the settings of ``RESUME_MAY_CHANGE`` from
    ``config`` (this invocation's)."""
    saved = dict(state["train_config"])
    for key in RESUME_MAY_CHANGE:
        saved[key] = getattr(config, key)
    saved["betas"] = tuple(saved["betas"])
    saved["exclude"] = tuple(saved["exclude"])
    return TrainConfig(**saved)


@dataclass(frozen=True)
class Processes:
    """This process's place in the run. torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain run is rank 0 of 1.
    ``device``: where this rank trains (under torchrun on CUDA, its own GPU)."""

    ddp: bool
    rank: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints."""
        return self.rank == 0

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` as the step trains it: DDP-wrapped under torchrun (gradients all-reduced), else ``net`` itself."""
        if not self.ddp:
            return net
        return DistributedDataParallel(net, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def autocast(self) -> ContextManager[Any]:
        """bf16 autocast on CUDA; nothing elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def any_rank(self, flag: bool) -> bool:
        """``flag`` of any rank, on every rank: whatever each decides alone, all must stop at the same step, or the
        others wait forever in the next all-reduce."""
        if not self.ddp:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def hardware(self) -> str:
        """The run's hardware in words, as the model card lists it ("2 x CPU, 1 torch threads")."""
        if self.device.type == "cuda":
            what = torch.cuda.get_device_name(self.device)
        else:
            what = f"CPU, {torch.get_num_threads()} torch threads"
        return f"{int(os.environ.get('WORLD_SIZE', '1'))} x {what}" if self.ddp else what


def join_processes(config: TrainConfig) -> Processes:
    """This process's rank and device, its process group joined under torchrun (NCCL on CUDA, else gloo), and
    ``config.threads`` torch CPU threads when set."""
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
    return Processes(ddp, rank, local_rank, device)


@dataclass
class Run:
    """What a checkpoint holds: both networks, their optimisers, the generator's EMA, the step, the training time
    (s), the loss history, the earlier phases and the configs."""

    config: TrainConfig
    model_config: ModelConfig
    generator: Generator
    discriminator: Discriminator
    g_ema: Generator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    step: int = 0
    wall_seconds: float = 0.0
    history: List[Dict[str, float]] = field(default_factory=list)
    phases: List[dict] = field(default_factory=list)

    def state(self, hardware: str) -> dict:
        """The checkpoint's content (see :func:`load_checkpoint`)."""
        return {
            "g": self.generator.state_dict(),
            "d": self.discriminator.state_dict(),
            "g_ema": self.g_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "history": self.history,
            "phases": self.phases,
            "model_config": self.model_config.to_dict(),
            "train_config": dataclasses.asdict(self.config),
            "hardware": hardware,
        }


def start_run(config: TrainConfig, model_config: ModelConfig, state: Optional[dict], device: torch.device) -> Run:
    """New networks and optimisers on ``device``, then the checkpoint ``state`` loaded into them (a resume), or
    the generator grown from ``config.init_from`` (a new phase), or neither (a fresh run)."""
    generator, discriminator = Generator(model_config).to(device), Discriminator(model_config).to(device)
    g_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    opt_g, opt_d = make_optimizer(generator.parameters(), config), make_optimizer(discriminator.parameters(), config)
    run = Run(config, model_config, generator, discriminator, g_ema, opt_g, opt_d)
    if state is not None:
        generator.load_state_dict(state["g"])
        discriminator.load_state_dict(state["d"])
        g_ema.load_state_dict(state["g_ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        run.step, run.wall_seconds, run.history = state["step"], state["wall_seconds"], list(state["history"])
        run.phases = list(state.get("phases", []))
    elif config.init_from:
        source = load_checkpoint(Path(config.init_from))
        grow(generator, g_ema, source)
        run.phases = list(source.get("phases", [])) + [phase_summary(source)]
    return run


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


class Log:
    """The losses' means over every ``log_every`` steps, into the run's history, TensorBoard (``OUT/tensorboard``)
    and the progress bar, and mid-slice images every ``image_every`` steps. Only the master rank writes; every rank
    keeps its sums, reset at the same steps."""

    def __init__(self, config: TrainConfig, step: int, master: bool):
        from tqdm import tqdm

        self.config = config
        self.writer = None
        if master:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(Path(config.out) / "tensorboard" / f"s{config.size}"), purge_step=step or None
            )
        self.bar = tqdm(total=config.steps, initial=step, disable=not master, dynamic_ncols=True)
        self.running: Dict[str, float] = {}
        self.window = 0  # steps summed in ``running`` (fewer than log_every right after a resume)

    def step(self, run: Run, losses: Dict[str, float], batch: Batch) -> None:
        """Record the step just taken (``run.step`` counts it) with its ``losses`` and ``batch``."""
        step, config = run.step, self.config
        for key, value in losses.items():
            self.running[key] = self.running.get(key, 0.0) + value
        self.window += 1
        self.bar.update(1)
        if self.writer is not None and (step % config.log_every == 0 or step == config.steps):
            means = {k: v / self.window for k, v in self.running.items()}
            run.history.append(
                {"step": step, "wall_seconds": round(run.wall_seconds, 1), **{k: round(v, 5) for k, v in means.items()}}
            )
            for key, value in means.items():
                self.writer.add_scalar(f"loss/{key}", value, step)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
        if step % config.log_every == 0:
            self.running, self.window = {}, 0
        if self.writer is not None and (step % config.image_every == 0 or step == 1):
            self.writer.add_image(
                "mid-slices (real | fake | EMA fake)", _mid_slices(batch, run.generator, run.g_ema), step
            )

    def close(self) -> None:
        """Close the progress bar and flush TensorBoard's events."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    """``mri-deidentify train``: train from scratch, from a checkpoint (``--resume``) or from a smaller or earlier
    run (``--init-from``) until ``--steps`` or ``--minutes``, checkpointing as it goes; with ``--export``, write the
    checkpoint's EMA generator and exit. Returns the exit status."""
    config, args = parse_args(argv)
    checkpoint_path = Path(config.checkpoint or Path(config.out) / "checkpoint.pt")
    if args.export:
        print(export(checkpoint_path, Path(args.export)))
        return 0

    processes = join_processes(config)
    state = load_checkpoint(checkpoint_path) if args.resume and checkpoint_path.exists() else None
    if state is not None:
        config = resumed_config(config, state)
        model_config = ModelConfig.from_dict(state["model_config"])
    else:
        model_config = ModelConfig(size=config.size, block=config.block)
    torch.manual_seed(config.seed)
    heads = load_heads(
        Path(config.data),
        Path(config.out) / "cache",
        config.size,
        config.margin_mm,
        config.exclude,
        processes.device,
        processes.rank,
    )
    run = start_run(config, model_config, state, processes.device)
    g_train, d_train = processes.wrap(run.generator), processes.wrap(run.discriminator)
    if processes.master:
        print(f"{len(heads)} training heads: {', '.join(h.name for h in heads)}", file=sys.stderr)
    log = Log(config, run.step, processes.master)

    last_save = invoked = time.time()
    while run.step < config.steps:
        start = time.time()
        # A step's randomness depends only on (seed, step, rank): exact resume without saving RNG states.
        rng = torch.Generator().manual_seed(config.seed * 1_000_003 + run.step * 1_009 + processes.rank)
        batch = make_batch(heads, config, model_config, rng, processes.device)
        losses = train_step(
            g_train, d_train, run.opt_g, run.opt_d, batch, config.recon_weight, processes.autocast, config.adversarial
        )
        update_ema(run.g_ema, run.generator, config.ema, run.step)
        run.step += 1
        run.wall_seconds += time.time() - start
        log.step(run, losses, batch)
        if config.minutes > 0 and processes.any_rank(time.time() - invoked > 60 * config.minutes):
            break
        if processes.master and time.time() - last_save > 60 * config.checkpoint_minutes:
            save_checkpoint(checkpoint_path, run.state(processes.hardware()))
            last_save = time.time()
    if processes.master:
        save_checkpoint(checkpoint_path, run.state(processes.hardware()))
    log.close()
    if processes.ddp:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
