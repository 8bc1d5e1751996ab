"""Training curves of a C-DeID-GAN checkpoint as a PNG (the logged history every checkpoint carries).

    python scripts/plot_training.py checkpoints/cdeidgan64.pt --out docs/training-curves.png

Top: the R-LSGAN losses of the discriminator and the generator (0.5 = the critic cannot tell real from
fake), when the run was adversarial. Bottom: the L1 between the blended fake and the real head (mean over
the scales). x: training step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from MRIDeIdentifyLib.train import load_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args()
    state = load_checkpoint(args.checkpoint)
    history = state["history"]
    if not history:
        raise SystemExit(f"{args.checkpoint}: no logged history")
    steps = [h["step"] for h in history]
    size = state["model_config"]["size"]
    adversarial = all("loss_d" in h for h in history)
    figure, axes = plt.subplots(
        2 if adversarial else 1, 1, figsize=(8, 6 if adversarial else 3.5), sharex=True, squeeze=False
    )
    bottom = axes[-1, 0]
    if adversarial:
        top = axes[0, 0]
        top.plot(steps, [h["loss_d"] for h in history], label="discriminator", lw=1)
        top.plot(steps, [h["loss_g"] for h in history], label="generator (adversarial)", lw=1)
        top.axhline(0.5, color="grey", lw=0.5, ls="--")
        top.set_ylabel("R-LSGAN loss")
        top.legend(loc="upper right")
    bottom.plot(steps, [h["recon"] for h in history], color="tab:green", lw=1)
    bottom.set_ylabel("L1, blended fake vs real")
    bottom.set_xlabel(f"step ({size}³; wall {state['wall_seconds'] / 60:.0f} min, {state['hardware']})")
    kind = "adversarial + L1" if adversarial else "L1 pre-training, no discriminator"
    figure.suptitle(f"{args.checkpoint.name}: {state['step']} steps, {kind}")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
