"""C-DeID-GAN networks (model.py): shapes at every scale, pyramids, losses, weights on disk."""

from __future__ import annotations

import json

import pytest
import torch

from MRIDeIdentifyLib.errors import InputError
from MRIDeIdentifyLib.model import (
    DEFAULT_WEIGHTS,
    Discriminator,
    Generator,
    ModelConfig,
    blend,
    discriminator_loss,
    gamma_pyramid,
    generator_loss,
    load_generator,
    noise,
    pyramid,
    save_generator,
)


def _ball(size: int, radius: float) -> torch.Tensor:
    axis = torch.arange(size) - (size - 1) / 2
    k, j, i = torch.meshgrid(axis, axis, axis, indexing="ij")
    return (k**2 + j**2 + i**2).sqrt() <= radius * size


def _gamma(batch: int, size: int) -> torch.Tensor:
    """A synthetic conditioning: hull = big ball, brain = small ball, brain values in (0.5, 1), and the skin as
    the scaled signed distance to a ball a little inside the hull."""
    hull, brain = _ball(size, 0.45).float(), _ball(size, 0.25).float()
    values = brain * (0.5 + 0.5 * torch.rand(size, size, size, generator=torch.Generator().manual_seed(1)))
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k, j, i = torch.meshgrid(axis, axis, axis, indexing="ij")
    skin = ((k**2 + j**2 + i**2).sqrt() / size - 0.42).mul(4.0).clamp(-1.0, 1.0)
    return torch.stack([hull, brain, values, skin])[None].repeat(batch, 1, 1, 1, 1)


def test_blocks_follow_the_size():
    for size, blocks in ((64, 5), (128, 6), (256, 7)):
        config = ModelConfig(size=size)
        assert config.n_blocks == blocks
        assert config.scales() == [4 * 2**k for k in range(blocks)]
        assert len(config.g_widths) == len(config.d_widths) == blocks
    with pytest.raises(ValueError):
        ModelConfig(size=48)
    with pytest.raises(ValueError):
        ModelConfig(block="transformer")


@pytest.mark.parametrize("block", ["dense", "mbconv"])
@pytest.mark.parametrize("size", [16, 32])
def test_output_shapes_at_every_scale(size, block):
    config = ModelConfig(size=size, block=block)
    gammas = gamma_pyramid(_gamma(2, size), config.n_blocks, torch.Generator().manual_seed(0))
    images = Generator(config)(gammas, noise(2, torch.Generator().manual_seed(0)))
    assert [tuple(g.shape) for g in images] == [(2, 1, s, s, s) for s in config.scales()]
    assert [tuple(g.shape) for g in gammas] == [(2, 4, s, s, s) for s in config.scales()]
    scores = Discriminator(config)(images, gammas)
    assert scores.shape == (2,)
    assert torch.isfinite(scores).all()


def test_gamma_pyramid_keeps_masks_binary_and_averages_the_brain():
    gamma = _gamma(1, 32)
    levels = gamma_pyramid(gamma, 4, torch.Generator().manual_seed(0))
    for level in levels:
        assert set(level[:, :2].unique().tolist()) <= {0.0, 1.0}
    # b*x is average-pooled: its total (mean) is kept exactly at every scale.
    means = [float(level[:, 2].mean()) for level in levels]
    assert means == pytest.approx([means[-1]] * 4, rel=1e-5)
    # The hull's proportion of ones is kept in expectation (here within a few per cent at 4³).
    assert float(levels[1][:, 0].mean()) == pytest.approx(float(gamma[:, 0].mean()), rel=0.1)


def test_blend_copies_the_brain_and_takes_the_generator_elsewhere():
    gamma = _gamma(1, 16)
    fake = torch.full((1, 1, 16, 16, 16), 7.0)
    reals = pyramid(gamma[:, 2:3], 3)
    blended = blend(pyramid(fake, 3), gamma_pyramid(gamma, 3), pyramid(gamma[:, 1:2], 3))
    brain = gamma[:, 1:2].bool()
    assert torch.equal(blended[-1][brain], reals[-1][brain])
    assert torch.equal(blended[-1][~brain], fake[~brain])


def test_relativistic_losses():
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # D wants real - fake = 1; G wants fake - real = 1.
    assert float(discriminator_loss(real, fake)) == pytest.approx(0.5 * (0.0 + 1.0) / 2)
    assert float(generator_loss(real, fake)) == pytest.approx(0.5 * (4.0 + 1.0) / 2)
    assert float(discriminator_loss(fake + 1, fake)) == 0.0


def test_noise_is_seeded():
    a = noise(1, torch.Generator().manual_seed(3))
    assert a.shape == (1, 1, 4, 4, 4)
    assert torch.equal(a, noise(1, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, noise(1, torch.Generator().manual_seed(4)))


def test_save_load_is_bit_exact_and_checks_the_sha256(tmp_path):
    config = ModelConfig(size=16)
    generator = Generator(config).eval()
    path = tmp_path / "g.safetensors"
    sha = save_generator(generator, path, {"note": "test"})
    loaded, loaded_config, loaded_sha = load_generator(path)
    assert loaded_sha == sha and loaded_config == config
    for (name, a), (_, b) in zip(generator.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    gammas = gamma_pyramid(_gamma(1, 16), config.n_blocks, torch.Generator().manual_seed(0))
    z = noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(generator(gammas, z)[-1], loaded(gammas, z)[-1])
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["note"] == "test" and card["sha256"] == sha

    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256"):
        load_generator(path)


def test_shipped_weights_load():
    generator, config, sha = load_generator()
    assert DEFAULT_WEIGHTS.stat().st_size <= 50 * 2**20
    assert config.size == 64 and len(sha) == 64
    assert not generator.training
