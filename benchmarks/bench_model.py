"""Cost of the C-DeID-GAN networks on CPU (or CUDA): a training step and generator inference, both block types.

Each case runs in a fresh process (``--threads`` torch threads) so peak RSS is the case's own (the child's
``ru_maxrss``, imports included). Inputs are synthetic (a ball-shaped gamma): the cost does not depend on the head.

- train: one full GAN step as train.train_step takes it (G forward, D on real+fake, D backward, D forward
  on real+fake, G backward, two AdamP updates), batch 1.
- pretrain: one L1 pre-training step (``--no-adversarial``: G forward, G backward, one update), batch 1.
- infer: generator forward under no_grad, batch 1 (what the ``remodel`` method runs).

    .venv/bin/python benchmarks/bench_model.py                 # 64³/128³ train, 128³/256³ inference, both blocks
    .venv/bin/python benchmarks/bench_model.py --quick         # dense only, without 256³
    .venv/bin/python benchmarks/bench_model.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from typing import List

import torch

CASES = [
    ("train", 64, "dense"),
    ("train", 64, "mbconv"),
    ("train", 128, "dense"),
    ("train", 128, "mbconv"),
    ("pretrain", 64, "dense"),
    ("pretrain", 128, "dense"),
    ("infer", 128, "dense"),
    ("infer", 128, "mbconv"),
    ("infer", 256, "dense"),
    ("infer", 256, "mbconv"),
]
# Measured once: the MobileNet-v2 generator needs ~2.8 GB for a 128³ forward pass and 8x that at 256³, more than
# a 2-core / 23 GB development machine can give beside other work.
SKIP_ON_CPU = {("infer", 256, "mbconv"): "needs ~22 GB on CPU (8x the 2.8 GB measured at 128³)"}


def run_case(kind: str, size: int, block: str, repeats: int, device: str) -> dict:
    from MRIDeIdentifyLib import train
    from MRIDeIdentifyLib.model import Discriminator, Generator, ModelConfig, gamma_pyramid, noise, pyramid

    torch.manual_seed(0)
    config = ModelConfig(size=size, block=block)
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k, j, i = torch.meshgrid(axis, axis, axis, indexing="ij")
    radius = (k**2 + j**2 + i**2).sqrt() / size
    hull, brain = (radius < 0.45).float(), (radius < 0.25).float()
    skin = ((radius - 0.45) * 8).clamp(-1, 1)  # the face prior's clipped signed distance (modelinputs.condition)
    gamma = torch.stack([hull, brain, brain * 0.8, skin])[None].to(device)
    rng = torch.Generator().manual_seed(0)
    gammas = gamma_pyramid(gamma, config.n_blocks, rng)
    z = noise(1, rng, device)
    generator = Generator(config).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else None
    if kind in ("train", "pretrain"):
        discriminator = Discriminator(config).to(device)
        settings = train.TrainConfig(size=size, block=block)
        opt_g = train.make_optimizer(generator.parameters(), settings)
        opt_d = train.make_optimizer(discriminator.parameters(), settings)
        x = (hull * 0.6 + brain * 0.4)[None, None].to(device)
        batch = train.Batch(
            reals=pyramid(x, config.n_blocks),
            fractions=pyramid(brain[None, None].to(device), config.n_blocks),
            gammas=gammas,
            noise=z,
        )

        def once():
            kwargs = {"autocast": autocast} if autocast else {}
            train.train_step(
                generator,
                discriminator,
                opt_g,
                opt_d,
                batch,
                settings.recon_weight,
                adversarial=kind == "train",
                **kwargs,
            )
    else:
        generator.eval()

        def once():
            with torch.no_grad():
                if autocast:
                    with autocast():
                        generator(gammas, z)
                else:
                    generator(gammas, z)

    times = []
    for _ in range(repeats + 1):  # the first pass warms up allocators and kernels
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "kind": kind,
        "size": size,
        "block": block,
        "seconds": sorted(times[1:])[len(times[1:]) // 2],
        "g_params": sum(p.numel() for p in generator.parameters()),
    }
    if device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def spawn(kind: str, size: int, block: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        f"{kind}:{size}:{block}",
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        return {"kind": kind, "size": size, "block": block, "error": stderr.strip().splitlines()[-1:]}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gb"] = result.pop("rss_kb") / 1e6
    return result


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="dense blocks only, no 256³")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.case:
        kind, size, block = args.case.split(":")
        result = run_case(kind, int(size), block, args.repeats, args.device)
        import resource

        result["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return 0

    print(
        f"# bench_model: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, device {args.device}, median of {args.repeats}\n"
    )
    print(
        "| pass | size | block | G params | seconds | peak RSS GB |"
        + (" peak GPU GB |" if args.device == "cuda" else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for kind, size, block in CASES:
        if args.quick and (block == "mbconv" or size == 256):
            continue
        skip = SKIP_ON_CPU.get((kind, size, block)) if args.device == "cpu" else None
        if skip:
            print(f"| {kind} | {size}³ | {block} | | skipped: {skip} | |")
            continue
        r = spawn(kind, size, block, args)
        if "error" in r:
            print(f"| {kind} | {size}³ | {block} | | failed: {r['error']} | |")
            continue
        gpu = f" {r['peak_gpu_gb']:.2f} |" if "peak_gpu_gb" in r else ""
        print(
            f"| {kind} | {size}³ | {block} | {r['g_params']:,} | {r['seconds']:.2f} | {r['peak_rss_gb']:.2f} |{gpu}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
