"""sfplus.objectives.gan: loss signs and values, finite-difference R1/R2, critic/generator terms (docs/algorithms.md,
'GAN term (DMD2)')."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfplus.flow import add_noise
from sfplus.nets.discriminator import DiscriminatorHead
from sfplus.nets.presets import build_dit
from sfplus.objectives.gan import (
    discriminator_logits,
    finite_difference_penalty,
    gan_critic_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    gan_generator_term,
)

D_FAKE = torch.tensor([-1.0, 0.5, 2.0])
D_REAL = torch.tensor([0.3, -0.2, 1.0])


@pytest.mark.parametrize("relativistic", [False, True])
def test_generator_loss_decreases_when_fake_logits_rise(relativistic):
    lo = gan_generator_loss(D_FAKE, D_REAL, relativistic=relativistic)
    hi = gan_generator_loss(D_FAKE + 1.0, D_REAL, relativistic=relativistic)
    assert hi < lo


@pytest.mark.parametrize("relativistic", [False, True])
def test_discriminator_loss_decreases_when_real_up_or_fake_down(relativistic):
    base = gan_discriminator_loss(D_REAL, D_FAKE, relativistic=relativistic)
    assert gan_discriminator_loss(D_REAL + 1.0, D_FAKE, relativistic=relativistic) < base
    assert gan_discriminator_loss(D_REAL, D_FAKE - 1.0, relativistic=relativistic) < base


def test_loss_values_by_hand():
    sp = F.softplus
    assert gan_generator_loss(D_FAKE, weight=0.1).item() == pytest.approx(0.1 * sp(-D_FAKE).mean().item())
    assert gan_generator_loss(D_FAKE, D_REAL, relativistic=True).item() == pytest.approx(
        sp(-(D_FAKE - D_REAL)).mean().item())
    assert gan_discriminator_loss(D_REAL, D_FAKE, weight=0.5).item() == pytest.approx(
        0.5 * (sp(-D_REAL).mean() + sp(D_FAKE).mean()).item())
    assert gan_discriminator_loss(D_REAL, D_FAKE, relativistic=True).item() == pytest.approx(
        sp(-(D_REAL - D_FAKE)).mean().item())
    with pytest.raises(ValueError, match="D\\(real\\)"):
        gan_generator_loss(D_FAKE, relativistic=True)


def test_r1_on_a_linear_discriminator_is_analytic():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)

    def d_fn(x):  # D(x) = <w, x> per sample: (D(x + s n) - D(x)) / s = <w, n> exactly
        return (x * w).flatten(1).sum(1)

    x = torch.randn(5, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    n = torch.randn(x.shape, generator=g, dtype=torch.float64)
    expected = ((n * w).flatten(1).sum(1) ** 2).mean()
    got = finite_difference_penalty(d_fn, x, 0.01, noise=n)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # with drawn noise its expectation is |grad D|^2 = |w|^2
    big = torch.randn(4000, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    est = finite_difference_penalty(d_fn, big, 0.01, generator=torch.Generator().manual_seed(1))
    assert est.item() == pytest.approx(w.pow(2).sum().item(), rel=0.1)
    with pytest.raises(ValueError, match="sigma"):
        finite_difference_penalty(d_fn, x, 0.0)


def _setup(seed=0):
    torch.manual_seed(seed)
    critic = build_dit("tiny")
    critic.init_weights()
    with torch.no_grad():
        critic.head.head.weight.normal_(std=0.2)
    head = DiscriminatorHead(32, 2, 2, ffn_dim=64)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (2, 16, 2, 4, 4)
    x_real, x_fake, eps = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([[300.0, 300.0], [700.0, 700.0]])
    cond = {"context": torch.randn(2, 5, 16, generator=g)}
    return critic, head, x_real, x_fake, eps, t, cond


def test_critic_loss_composition_and_gradients():
    critic, head, x_real, x_fake, eps, t, cond = _setup()
    gen_w = nn.Parameter(torch.tensor(1.0))
    loss, logs = gan_critic_loss(critic, head, x_real, gen_w * x_fake, t, eps, cond, (0, 1), gan_d_weight=0.1,
                                 r1_weight=2.0, r2_weight=3.0, r1_sigma=0.05, r2_sigma=0.02,
                                 generator=torch.Generator().manual_seed(5))
    # the batched forward gives the same logits as separate ones
    with torch.no_grad():
        d_real = discriminator_logits(critic, head, add_noise(x_real, eps, t), t, cond, (0, 1))
        d_fake = discriminator_logits(critic, head, add_noise(x_fake, eps, t), t, cond, (0, 1))
    assert logs["d_real"].item() == pytest.approx(d_real.mean().item(), abs=1e-5)
    assert logs["loss_d"].item() == pytest.approx(gan_discriminator_loss(d_real, d_fake, weight=0.1).item(), rel=1e-4)
    # R1 reproduced with the same noise draws (r1's noise first, then r2's)
    g = torch.Generator().manual_seed(5)
    n1 = torch.randn(x_real.shape, generator=g)
    torch.randn(x_real.shape, generator=g)  # r2's draw: advances the stream as the loss does
    with torch.no_grad():
        xr = add_noise(x_real, eps, t)
        r1 = (((discriminator_logits(critic, head, xr + 0.05 * n1, t, cond, (0, 1)) - d_real) / 0.05) ** 2).mean()
    assert logs["r1"].item() == pytest.approx(r1.item(), rel=1e-3)
    total = logs["loss_d"] + 0.5 * (2.0 * logs["r1"] + 3.0 * logs["r2"])
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    loss.backward()
    assert gen_w.grad is None  # generated latents are detached in the critic step
    assert all(p.grad is not None for p in head.parameters())
    assert critic.blocks[0].self_attn.k.weight.grad.abs().sum() > 0


def test_critic_loss_without_penalties_skips_them():
    critic, head, x_real, x_fake, eps, t, cond = _setup()
    loss, logs = gan_critic_loss(critic, head, x_real, x_fake, t, eps, cond, (0, 1), relativistic=True)
    assert "r1" not in logs and "r2" not in logs
    assert loss.item() == pytest.approx(logs["loss_d"].item())


@pytest.mark.parametrize("relativistic", [False, True])
def test_generator_term_reaches_the_generated_latents(relativistic):
    critic, head, x_real, x_fake, eps, t, cond = _setup()
    x_fake = x_fake.clone().requires_grad_(True)
    loss, logs = gan_generator_term(critic, head, x_fake, t, eps, cond, (0, 1), x_real=x_real,
                                    relativistic=relativistic, gan_g_weight=0.5,
                                    generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        d_fake = discriminator_logits(critic, head, add_noise(x_fake, eps, t), t, cond, (0, 1))
        eps_real = torch.randn(x_real.shape, generator=torch.Generator().manual_seed(9))
        d_real = discriminator_logits(critic, head, add_noise(x_real, eps_real, t), t, cond, (0, 1))
    expected = gan_generator_loss(d_fake, d_real, relativistic=relativistic, weight=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert x_fake.grad is not None and x_fake.grad.abs().sum() > 0
    if relativistic:
        with pytest.raises(ValueError, match="x_real"):
            gan_generator_term(critic, head, x_fake, t, eps, cond, (0, 1), relativistic=True)


def test_relativistic_generator_term_noises_the_real_latents_independently():
    """The reference's generator step draws fresh noise for the real latents (its critic step reuses the fake's):
    D(real) is evaluated at add_noise(x_real, eps_real, t), not at the fake sample's eps."""
    critic, head, x_real, x_fake, eps, t, cond = _setup()
    eps_real = torch.randn(x_real.shape, generator=torch.Generator().manual_seed(3))
    loss, logs = gan_generator_term(critic, head, x_fake, t, eps, cond, (0, 1), x_real=x_real, eps_real=eps_real,
                                    relativistic=True)
    with torch.no_grad():
        fresh = discriminator_logits(critic, head, add_noise(x_real, eps_real, t), t, cond, (0, 1))
        shared = discriminator_logits(critic, head, add_noise(x_real, eps, t), t, cond, (0, 1))
    assert logs["d_real"].item() == pytest.approx(fresh.mean().item(), rel=1e-5)
    assert abs(logs["d_real"].item() - shared.mean().item()) > 1e-4
    # the non-relativistic term reads no real latents and draws no noise
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    _, logs = gan_generator_term(critic, head, x_fake, t, eps, cond, (0, 1), x_real=x_real, generator=g)
    assert "d_real" not in logs and torch.equal(g.get_state(), state)
