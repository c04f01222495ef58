"""The causal diffusion (diffusion forcing / teacher forcing) loss is weighted per frame by the reference's bell
curve (docs/algorithms.md, 'Causal diffusion (teacher forcing)', step 4). tools/reference_check.py found the
unweighted mean (a 30-40 % loss difference against the reference's CausalDiffusion.generator_loss)."""

from types import SimpleNamespace

import pytest
import torch

from sfplus.flow import training_weight
from sfplus.modules.diffusion import DiffusionModule
from sfplus.nets.causal import BlockCausal
from sfplus.noise import SampleNoise
from sfplus.objectives.timesteps import block_training_timesteps


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_causal_diffusion_loss_is_bell_weighted_per_frame(teacher_forcing):
    b, c, f, h, w = 2, 4, 6, 2, 2
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(b, c, f, h, w, generator=g), torch.randn(b, c, f, h, w, generator=g)
    # Predicts v = 0 (x0 = x_t): the per-element error is the flow target (eps - x0) squared.
    net = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    module = SimpleNamespace(causal=BlockCausal(3), train_shift=5.0, model=net, teacher_forcing=teacher_forcing,
                             noise_augmentation_max_timestep=0, device="cpu")
    loss = DiffusionModule._causal_loss(module, x0, eps, {}, SampleNoise([1, 2]))
    t = block_training_timesteps(b, f, frames_per_block=3, shift=5.0, generator=SampleNoise([1, 2]))
    per_frame = ((eps - x0) ** 2).mean(dim=(1, 3, 4))  # [B, F]
    expected = (per_frame * training_weight(t, 5.0)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert not torch.allclose(loss, per_frame.mean(), rtol=1e-3)


def test_teacher_forcing_noise_augmentation_is_small_and_one_level_per_sample():
    """Deliberate difference (docs/reference_equivalence.md, B30): the clean context is noised to one level per sample
    in [0, noise_augmentation_max_timestep) — small noise, as intended. The reference draws a per-block index into its
    *descending* grid, i.e. levels near t = 1000 (almost pure noise)."""
    b, c, f, h, w = 2, 4, 6, 2, 2
    x0, eps = torch.randn(b, c, f, h, w), torch.randn(b, c, f, h, w)
    seen = {}

    def net(x, t, clean_t=None, **kw):
        seen["clean_t"] = clean_t
        return torch.zeros_like(x)

    module = SimpleNamespace(causal=BlockCausal(3), train_shift=5.0, model=net, teacher_forcing=True,
                             noise_augmentation_max_timestep=100, device="cpu")
    DiffusionModule._causal_loss(module, x0, eps, {}, SampleNoise([3, 4]))
    clean_t = seen["clean_t"]
    assert clean_t.shape == (b, f)
    assert bool(((clean_t >= 0) & (clean_t < 100)).all())
    assert bool((clean_t == clean_t[:, :1]).all())  # one level per sample
