"""C-DeID-GAN (paper 3.2): a conditional multi-scale 3-D generator and its discriminator, read top to bottom.

Tensors are (batch, channels, S, S, S) on the model grid (KJI axes, see modelgrid.py). A pyramid is a list of such
tensors from the coarsest scale (4³) to the finest (S³). The conditioning has four channels: the paper's gamma, c
(convex hull, binary), b (brain mask, binary) and b*x (brain intensities, normalised units), as
privacy.privacy_transform returns them, and our addition, the face prior's skin as a clipped signed distance in
[-1, 1] (modelinputs.condition).

- Generator: NB = log2(S/4)+1 blocks. Block k takes the previous scale's single-channel image, upsampled by
  nearest neighbour, plus gamma_k, and returns the single-channel image g_k (the paper's bottleneck between scales).
  g_0 ~ N(0, 1) at 4³ is the only randomness, drawn from a seeded torch.Generator.
- Discriminator: NB blocks that halve the resolution, each fed the previous block's features, the image at that
  scale and gamma_k, ending in one linear layer (a scalar per sample).
- Losses: relativistic non-averaging least-squares GAN (R-LSGAN), each real paired with the fake generated from
  the same gamma.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .privacy import probabilistic_binary_pool

MIN_SIZE = 4
SIZES = (64, 128, 256)
CONDITION_CHANNELS = 4
# Inside the package, so that a plain wheel and the Slicer module both carry the weights.
MODELS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = MODELS_DIR / "cdeidgan64.safetensors"

# Channels per scale, keyed by the scale's edge in voxels. Wide where volumes are tiny, narrow where they are
# large: the two finest scales dominate the cost (see benchmarks/bench_model.py).
_GENERATOR_WIDTHS = {4: 64, 8: 64, 16: 32, 32: 16, 64: 8, 128: 8, 256: 4}
_DISCRIMINATOR_WIDTHS = {256: 4, 128: 8, 64: 8, 32: 16, 16: 32, 8: 64, 4: 64}


@dataclass
class ModelConfig:
    """Architecture of a generator/discriminator pair.

    size: edge of the finest scale in voxels (64, 128 or 256; tests may use 16 or 32).
    block: "dense" (two dense 3³ convolutions; the default, ~15x faster on CPU) or "mbconv" (MobileNet-v2
        inverted residuals with depthwise 3³ convolutions, the paper's choice to save GPU memory).
    g_widths: generator channels per block, coarsest (4³) first. Empty -> a default per scale.
    d_widths: discriminator channels per block, finest (S³) first. Empty -> a default per scale.
    expand: expansion factor of the inverted residuals ("mbconv" only).
    """

    size: int = 64
    block: str = "dense"
    g_widths: Tuple[int, ...] = field(default_factory=tuple)
    d_widths: Tuple[int, ...] = field(default_factory=tuple)
    expand: int = 4

    def __post_init__(self) -> None:
        if self.size < MIN_SIZE or self.size & (self.size - 1):
            raise ValueError(f"model size must be a power of two >= {MIN_SIZE}, not {self.size}")
        if self.block not in ("dense", "mbconv"):
            raise ValueError(f"block must be 'dense' or 'mbconv', not {self.block!r}")
        self.g_widths = tuple(self.g_widths) or tuple(_GENERATOR_WIDTHS[r] for r in self.scales())
        self.d_widths = tuple(self.d_widths) or tuple(_DISCRIMINATOR_WIDTHS[r] for r in reversed(self.scales()))
        if len(self.g_widths) != self.n_blocks or len(self.d_widths) != self.n_blocks:
            raise ValueError(f"need {self.n_blocks} widths per network for size {self.size}")

    @property
    def n_blocks(self) -> int:
        return int(math.log2(self.size // MIN_SIZE)) + 1

    def scales(self) -> List[int]:
        """Edge in voxels of each scale, coarsest first: [4, 8, ..., size]."""
        return [MIN_SIZE * 2**k for k in range(self.n_blocks)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------------------------------------------- blocks


class DenseBlock(nn.Module):
    """A 1³ stem to ``width``, two dense 3³ convolutions and a 1³ projection to ``out_channels``."""

    def __init__(self, in_channels: int, width: int, out_channels: int, norm: bool):
        super().__init__()
        # The 1³ stem is there for speed: PyTorch's CPU backend falls back to a slow im2col path for 3³
        # convolutions with few input channels (4 -> 8 at 64³ costs 4x an 8 -> 8 one).
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, width, 1),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, width, 3, padding=1),
            _norm(width, norm),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, width, 3, padding=1),
            _norm(width, norm),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class InvertedResidual(nn.Module):
    """MobileNet-v2 unit: 1³ expansion, depthwise 3³, 1³ linear projection, identity shortcut."""

    def __init__(self, width: int, expand: int, norm: bool):
        super().__init__()
        hidden = width * expand
        self.body = nn.Sequential(
            nn.Conv3d(width, hidden, 1),
            _norm(hidden, norm),
            nn.LeakyReLU(0.2),
            nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden),
            _norm(hidden, norm),
            nn.LeakyReLU(0.2),
            nn.Conv3d(hidden, width, 1),
            _norm(width, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MBConvBlock(nn.Module):
    """1³ stem to ``width``, two inverted residuals, 1³ projection to ``out_channels``."""

    def __init__(self, in_channels: int, width: int, out_channels: int, norm: bool, expand: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, width, 1),
            nn.LeakyReLU(0.2),
            InvertedResidual(width, expand, norm),
            InvertedResidual(width, expand, norm),
            nn.Conv3d(width, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _norm(channels: int, enabled: bool) -> nn.Module:
    # GroupNorm, not BatchNorm: batches are 1-2 volumes, and per-sample statistics keep a DDP step equal to
    # a single-process step on the same batch.
    return nn.GroupNorm(min(8, channels), channels) if enabled else nn.Identity()


def last_convolution(block: nn.Module) -> nn.Conv3d:
    """The convolution a block of either kind ends with: its 1³ projection to the block's output channels."""
    return [m for m in block.modules() if isinstance(m, nn.Conv3d)][-1]


def _block(config: ModelConfig, in_channels: int, width: int, out_channels: int, norm: bool) -> nn.Module:
    if config.block == "dense":
        return DenseBlock(in_channels, width, out_channels, norm)
    return MBConvBlock(in_channels, width, out_channels, norm, config.expand)


# ---------------------------------------------------------------------------------------------------- networks


class Generator(nn.Module):
    """gamma pyramid + noise at 4³ -> the fake images g_1..g_NB (single channel, normalised units)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            _block(config, 1 + CONDITION_CHANNELS, width, 1, norm=True) for width in config.g_widths
        )

    def forward(self, gammas: List[torch.Tensor], noise: torch.Tensor) -> List[torch.Tensor]:
        images = []
        g = noise
        for k, (block, gamma) in enumerate(zip(self.blocks, gammas)):
            if k == 0:
                g = block(torch.cat([g, gamma], 1))
            else:
                # Each finer block adds detail to the upsampled coarser image rather than redrawing it, so the
                # coarse scales keep the head's layout and the fine ones only learn texture and edges.
                g = F.interpolate(g, scale_factor=2.0, mode="nearest")
                g = g + block(torch.cat([g, gamma], 1))
            images.append(g)
        return images


class Discriminator(nn.Module):
    """An image pyramid (real, or fake blended with the brain) + gamma pyramid -> one score per sample."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        blocks = []
        previous = 0
        for width in config.d_widths:
            blocks.append(_block(config, previous + 1 + CONDITION_CHANNELS, width, width, norm=False))
            previous = width
        self.blocks = nn.ModuleList(blocks)
        # The last block halves 4³ to 2³. No bias: the relativistic losses see only score differences.
        self.head = nn.Linear(previous * (MIN_SIZE // 2) ** 3, 1, bias=False)
        # Spectral normalisation bounds the critic's slope. Without it the relativistic losses, which only see
        # score differences, let the scores grow without limit: a 32³ CPU run at lr 2e-3 blew up (losses 1e11)
        # after 220 steps and took the generator with it.
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.utils.parametrizations.spectral_norm(module)

    def forward(self, images: List[torch.Tensor], gammas: List[torch.Tensor]) -> torch.Tensor:
        features: List[torch.Tensor] = []  # the previous block's output; none before the finest block
        for block, image, gamma in zip(self.blocks, reversed(images), reversed(gammas)):
            features = [F.avg_pool3d(F.leaky_relu(block(torch.cat(features + [image, gamma], 1)), 0.2), 2)]
        return self.head(features[0].flatten(1)).squeeze(1)


# ---------------------------------------------------------------------------------------------------- pyramids


def noise(batch: int, generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """g_0 ~ N(0, 1): (batch, 1, 4, 4, 4), drawn on the CPU from ``generator`` so a seed means the same on any device."""
    return torch.randn((batch, 1) + (MIN_SIZE,) * 3, generator=generator).to(device)


def pyramid(volume: torch.Tensor, n_scales: int) -> List[torch.Tensor]:
    """Average-pooled copies of (B, C, S, S, S) down to S / 2^(n-1), coarsest first; the last item is ``volume`` itself."""
    levels = [volume]
    for _ in range(n_scales - 1):
        levels.append(F.avg_pool3d(levels[-1], 2))
    return levels[::-1]


def gamma_pyramid(
    gamma: torch.Tensor, n_scales: int, generator: Optional[torch.Generator] = None
) -> List[torch.Tensor]:
    """The conditioning (B, C, S, S, S) at every scale, coarsest first.

    The binary channels (c, b) are pooled with the probabilistic binary pooling, so they stay binary and keep
    their proportion of ones in expectation; b*x and the skin distance are average-pooled.
    """
    levels = [gamma]
    for _ in range(n_scales - 1):
        g = levels[-1]
        binary = probabilistic_binary_pool(g[:, :2], factor=2, generator=generator).to(g.dtype)
        levels.append(torch.cat([binary, F.avg_pool3d(g[:, 2:], 2)], 1))
    return levels[::-1]


def blend(
    images: List[torch.Tensor], gammas: List[torch.Tensor], brain_fractions: List[torch.Tensor]
) -> List[torch.Tensor]:
    """f_k = b*x + (1 - b) * g_k at every scale: the generator's images around the real brain.

    ``brain_fractions`` is the average-pooled brain mask (``pyramid(b)``): the share of each coarse voxel that
    is brain, so a coarse fake border voxel mixes like the average-pooled real one.
    """
    return [gamma[:, 2:3] + (1.0 - fraction) * image for image, gamma, fraction in zip(images, gammas, brain_fractions)]


# ---------------------------------------------------------------------------------------------------- losses


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """R-LSGAN, non-averaging: 1/2 E[(D(x_f) - D(x_r) + 1)^2], pairs from the same gamma."""
    return 0.5 * ((fake_scores - real_scores + 1.0) ** 2).mean()


def generator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """R-LSGAN, non-averaging: 1/2 E[(D(x_r) - D(x_f) + 1)^2]."""
    return 0.5 * ((real_scores - fake_scores + 1.0) ** 2).mean()


# ---------------------------------------------------------------------------------------------------- weights


def save_generator(generator: Generator, path: str | Path, extra: Optional[dict] = None) -> str:
    """Write the generator's weights to ``path`` (safetensors) and ``path`` with .json (config, sha256, ``extra``).

    Returns the sha256 (hex) of the weights file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in generator.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    sha256 = file_sha256(path)
    card = {"model": "C-DeID-GAN generator", "config": generator.config.to_dict(), "sha256": sha256}
    card.update(extra or {})
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return sha256


def load_generator(
    path: str | Path | None = None, device: torch.device | str = "cpu"
) -> Tuple[Generator, ModelConfig, str]:
    """Load a generator written by :func:`save_generator`: (generator in eval mode on ``device``, config, sha256).

    ``path`` is the .safetensors file (default: the shipped 64³ weights); its .json sibling must give the same
    sha256 as the file's bytes. Nothing is unpickled.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise InputError(f"model weights not found: {path} (and its .json config beside it)")
    try:
        card = json.loads(card_path.read_text())
        config = ModelConfig.from_dict(card["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{card_path.name}: not a valid model card ({type(error).__name__}: {error})") from None
    sha256 = file_sha256(path)
    if card.get("sha256") != sha256:
        raise InputError(f"model weights {path.name} do not match the sha256 in {card_path.name}")
    generator = Generator(config)
    generator.load_state_dict(load_file(str(path)))
    return generator.to(device).eval(), config, sha256


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
