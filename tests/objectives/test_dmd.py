"""sfplus.objectives.dmd against hand-computed values (docs/algorithms.md, 'DMD')."""

import pytest
import torch
from torch import nn

from sfplus.objectives.dmd import critic_flow_loss, dmd_generator_loss, dmd_kl_grad, real_score_cfg

SHAPE = (2, 3, 4, 5, 6)  # [B, C, F, H, W]


def _randn(seed, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _bcast(t):
    return t.view(t.shape[0], 1, t.shape[1], 1, 1)


class AffineNet:
    """Deterministic flow net ``v = a * x + context`` (``context`` broadcastable to the video), counting calls."""

    def __init__(self, a):
        self.a = a
        self.n = 0

    def __call__(self, x, t, *, context):
        self.n += 1
        return self.a * x + context


def _setup():
    # Samples with very different scales so a per-sample (not global) normalisation is visible.
    x = _randn(0, dtype=torch.float64)
    x[1] *= 10
    x = x.float()
    eps = _randn(1)
    t = torch.tensor([[300.0] * 4, [900.0] * 4])
    cond = {"context": _randn(2)}
    uncond = {"context": _randn(3)}
    return x, eps, t, cond, uncond


def _x0_by_hand(a, x_t, t, context):
    s = _bcast(t).double() / 1000
    v = a * x_t.double() + context.double()
    return x_t.double() - s * v


def test_kl_grad_by_hand():
    x, eps, t, cond, uncond = _setup()
    fake, real = AffineNet(0.3), AffineNet(-0.4)
    g = 5.0
    out = dmd_kl_grad(x, t, eps, fake=fake, real=real, cond=cond, uncond=uncond, real_guidance_scale=g)

    s = _bcast(t).double() / 1000
    x_t = (1 - s) * x.double() + s * eps.double()
    f = _x0_by_hand(0.3, x_t, t, cond["context"])
    r_c = _x0_by_hand(-0.4, x_t, t, cond["context"])
    r_u = _x0_by_hand(-0.4, x_t, t, uncond["context"])
    r = r_c + g * (r_c - r_u)
    norm = (x.double() - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = (f - r) / norm

    torch.testing.assert_close(out.grad.double(), grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.real_x0.double(), r, atol=1e-5, rtol=1e-4)
    assert out.gradient_norm.item() == pytest.approx(grad.abs().mean().item(), rel=1e-4)
    assert not out.grad.requires_grad
    assert (fake.n, real.n) == (1, 2)  # no fake CFG by default; real: cond + uncond


def test_kl_grad_fake_guidance():
    x, eps, t, cond, uncond = _setup()
    fake, real = AffineNet(0.3), AffineNet(-0.4)
    out = dmd_kl_grad(
        x, t, eps, fake=fake, real=real, cond=cond, uncond=uncond, real_guidance_scale=2.0, fake_guidance_scale=1.5
    )
    s = _bcast(t).double() / 1000
    x_t = (1 - s) * x.double() + s * eps.double()
    f_c = _x0_by_hand(0.3, x_t, t, cond["context"])
    f_u = _x0_by_hand(0.3, x_t, t, uncond["context"])
    f = f_c + 1.5 * (f_c - f_u)
    r_c = _x0_by_hand(-0.4, x_t, t, cond["context"])
    r = r_c + 2.0 * (r_c - _x0_by_hand(-0.4, x_t, t, uncond["context"]))
    grad = (f - r) / (x.double() - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(out.grad.double(), grad, atol=1e-5, rtol=1e-4)
    assert fake.n == 2


def test_real_score_cfg_convention():
    x_t = _randn(4)
    t = torch.full((2, 4), 500.0)
    real = AffineNet(0.25)
    c, u = {"context": _randn(5)}, {"context": _randn(6)}
    r_c = _x0_by_hand(0.25, x_t, t, c["context"])
    r_u = _x0_by_hand(0.25, x_t, t, u["context"])
    got = real_score_cfg(real, x_t, t, c, u, 3.0)
    torch.testing.assert_close(got.double(), r_c + 3.0 * (r_c - r_u), atol=1e-5, rtol=1e-5)
    # Same thing as Wan-style CFG with scale s + 1.
    torch.testing.assert_close(got.double(), r_u + 4.0 * (r_c - r_u), atol=1e-5, rtol=1e-5)
    # Scale 0: the conditional branch only, one call.
    real.n = 0
    torch.testing.assert_close(real_score_cfg(real, x_t, t, c, u, 0.0).double(), r_c, atol=1e-5, rtol=1e-5)
    assert real.n == 1


def test_kl_grad_zero_when_fake_equals_real():
    x, eps, t, cond, uncond = _setup()
    out = dmd_kl_grad(x, t, eps, fake=AffineNet(0.1), real=AffineNet(0.1), cond=cond, uncond=uncond,
                      real_guidance_scale=0.0)
    assert out.grad.abs().max().item() < 1e-5


def test_generator_loss_grad_and_value():
    x = _randn(7).requires_grad_(True)
    grad = _randn(8)
    loss = dmd_generator_loss(x, grad)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.5 * grad.double().pow(2).mean().item(), rel=1e-9)
    loss.backward()
    torch.testing.assert_close(x.grad, grad / grad.numel(), atol=1e-12, rtol=1e-5)


def test_generator_loss_with_mask():
    x = _randn(7).requires_grad_(True)
    grad = _randn(8)
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[:, :, :2] = False  # drop the first block (2 frames), as for long rollouts
    n = int(mask.sum())
    loss = dmd_generator_loss(x, grad, mask)
    assert loss.item() == pytest.approx(0.5 * grad[mask].double().pow(2).mean().item(), rel=1e-9)
    loss.backward()
    torch.testing.assert_close(x.grad[mask], grad[mask] / n, atol=1e-12, rtol=1e-5)
    assert torch.all(x.grad[~mask] == 0)


class ParamNet(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x, t, *, context):
        return self.a * x + self.b * context


def test_critic_flow_loss_by_hand_and_grads():
    x, eps, t, cond, _ = _setup()
    t = torch.tensor([[20.0] * 4, [980.0] * 4])
    fake = ParamNet(0.3, -0.2)
    gen_w = nn.Parameter(torch.tensor(1.5))
    x_gen = gen_w * x  # carries a graph to a "generator" parameter, which the critic loss must cut
    loss = critic_flow_loss(fake, x_gen, t, eps, cond)

    s = _bcast(t).double() / 1000
    xg = x_gen.detach().double()
    x_t = (1 - s) * xg + s * eps.double()
    v_fake = 0.3 * x_t - 0.2 * cond["context"].double()
    expected = ((v_fake - (eps.double() - xg)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)

    loss.backward()
    assert gen_w.grad is None
    assert fake.a.grad is not None and fake.a.grad.abs() > 0 and fake.b.grad.abs() > 0
    # d loss / d a = mean(2 (v - target) x_t)
    da = (2 * (v_fake - (eps.double() - xg)) * x_t).mean()
    assert fake.a.grad.item() == pytest.approx(da.item(), rel=1e-3)


def test_critic_flow_loss_zero_for_exact_flow():
    x, eps, t, cond, _ = _setup()

    def oracle(x_t, t, *, context):  # the flow target itself
        return eps - x

    assert critic_flow_loss(oracle, x, t, eps, cond).item() < 1e-8
