"""sfplus.objectives.sid against a hand computation and its analytic gradient (docs/algorithms.md, 'SiD')."""

import pytest
import torch
from torch import nn

from sfplus.flow import predict_x0
from sfplus.nets.causal import BlockCausal
from sfplus.nets.presets import build_dit
from sfplus.objectives.sid import sid_generator_loss, sid_loss_from_scores

SHAPE = (2, 3, 4, 2, 2)  # [B, C, F, H, W]
A_FAKE, A_REAL, G, ALPHA = 0.3, -0.4, 2.5, 1.2


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class AffineNet(nn.Module):
    """Flow net ``v = a * x + context`` with a learnable ``a``."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, t, *, context):
        return self.a * x + context


def _setup():
    x = _randn(0)
    x[1] *= 5  # per-sample normalisation must be visible
    eps, c, u = _randn(1), _randn(2), _randn(3)
    t = torch.tensor([[300.0] * 4, [800.0] * 4], dtype=torch.float64)
    return x, eps, t, {"context": c}, {"context": u}


def _by_hand(x, eps, t, c, u):
    """Everything in float64 from the formulas; returns (loss, s, norm)."""
    s = t.view(2, 1, 4, 1, 1) / 1000
    x_t = (1 - s) * x + s * eps

    def x0(a, ctx):
        return x_t - s * (a * x_t + ctx)

    f = x0(A_FAKE, c)
    r_c, r_u = x0(A_REAL, c), x0(A_REAL, u)
    r = r_c + G * (r_c - r_u)
    norm = (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    elem = (r - f) * ((r - x) - ALPHA * (r - f)) / norm
    return elem.mean(), s, norm, f, r


def test_loss_value_and_dtype():
    x, eps, t, cond, uncond = _setup()
    loss, logs = sid_generator_loss(x.float(), t.float(), eps.float(), fake=AffineNet(A_FAKE), real=AffineNet(A_REAL),
                                    cond=cond, uncond=uncond, real_guidance_scale=G, alpha=ALPHA)
    expected, _, norm, f, r = _by_hand(x, eps, t, cond["context"], uncond["context"])
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert logs["sid_normaliser"].item() == pytest.approx(norm.mean().item(), rel=1e-4)
    assert logs["sid_score_gap"].item() == pytest.approx((r - f).abs().mean().item(), rel=1e-4)


def test_gradient_matches_analytic_derivative():
    """dL/dx through x directly and through both nets' inputs, with the normaliser held constant."""
    x, eps, t, cond, uncond = _setup()
    x = x.clone().requires_grad_(True)
    fake, real = AffineNet(A_FAKE), AffineNet(A_REAL)
    loss, _ = sid_generator_loss(x, t, eps, fake=fake, real=real, cond=cond, uncond=uncond,
                                 real_guidance_scale=G, alpha=ALPHA)
    loss.backward()

    _, s, norm, f, r = _by_hand(x.detach(), eps, t, cond["context"], uncond["context"])
    # x0 of an affine net is affine in x: d x0 / d x = (1 - s a)(1 - s); CFG of one net keeps the real slope.
    rho_f, rho_r = (1 - s * A_FAKE) * (1 - s), (1 - s * A_REAL) * (1 - s)
    gap, dev = r - f, r - x.detach()
    d_gap, d_dev = rho_r - rho_f, rho_r - 1
    analytic = (d_gap * (dev - ALPHA * gap) + gap * (d_dev - ALPHA * d_gap)) / norm / x.numel()
    # (tolerance: flow.add_noise / flow_to_x0 compute in float32 even for float64 inputs)
    torch.testing.assert_close(x.grad, analytic, atol=1e-8, rtol=2e-5)
    # the score nets' parameters are on the graph too (the caller freezes or discards them)
    assert fake.a.grad is not None and real.a.grad is not None


def test_gradient_matches_autograd_of_formula_float32_nets():
    """Autograd of the formula written out by hand (normaliser detached) equals the loss's gradient."""
    x, eps, t, cond, uncond = _setup()
    x1 = x.float().clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    loss, _ = sid_generator_loss(x1, t.float(), eps.float(), fake=AffineNet(A_FAKE).float(),
                                 real=AffineNet(A_REAL).float(), cond=cond, uncond=uncond, real_guidance_scale=G,
                                 alpha=ALPHA)
    loss.backward()
    s = t.view(2, 1, 4, 1, 1) / 1000
    x_t = (1 - s) * x2 + s * eps
    x0 = lambda a, ctx: x_t - s * (a * x_t + ctx)  # noqa: E731
    f = x0(A_FAKE, cond["context"])
    r = x0(A_REAL, cond["context"]) * (1 + G) - G * x0(A_REAL, uncond["context"])
    norm = (x2 - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True).detach()
    ((r - f) * ((r - x2) - ALPHA * (r - f)) / norm).mean().backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, atol=1e-7, rtol=1e-4)


def test_zero_when_fake_equals_real_and_nan_guard():
    x, eps, t, cond, uncond = _setup()
    loss, _ = sid_loss_from_scores(x, x + 1.0, x + 1.0)
    assert loss.item() == 0.0
    # r == x exactly in sample 0: zero normaliser → that sample contributes 0, with a zero (not nan) gradient
    x = x.clone().requires_grad_(True)
    r = x.detach() + 0.5
    r[0] = x[0].detach()
    loss, _ = sid_loss_from_scores(x, x.detach() + 1.0, r)
    loss.backward()
    elem1 = (r[1] - x[1] - 1.0) * ((r[1] - x[1]) - (r[1] - x[1] - 1.0)) / (x[1] - r[1]).abs().mean()
    assert loss.item() == pytest.approx(elem1.mean().item() / 2, rel=1e-12)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[0] == 0)


def test_mask_restricts_mean():
    x, f, r = _randn(4), _randn(5), _randn(6)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[:, :, 2:] = True
    full, _ = sid_loss_from_scores(x, f, r, alpha=0.5)
    masked, _ = sid_loss_from_scores(x, f, r, alpha=0.5, mask=mask)
    norm = (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    elem = (r - f) * ((r - x) - 0.5 * (r - f)) / norm
    assert full.item() == pytest.approx(elem.mean().item(), rel=1e-12)
    assert masked.item() == pytest.approx(elem[mask].mean().item(), rel=1e-12)


def test_runs_on_a_block_causal_generator():
    """SiD only needs x: a causal WanDiT generator's one-step output gets gradients."""
    torch.manual_seed(0)
    gen = build_dit("tiny")
    gen.init_weights()
    with torch.no_grad():
        gen.head.head.weight.normal_(std=0.2)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 4, 4, 4, generator=g)
    cond = {"context": torch.randn(1, 5, 16, generator=g)}
    causal = BlockCausal(2)
    x = predict_x0(lambda x, t, **c: gen(x, t, **c, causal=causal), noise, torch.full((1, 4), 1000.0), cond)
    fake, real = AffineNet(A_FAKE).float(), AffineNet(A_REAL).float()
    ctx = {"context": torch.randn(1, 16, 4, 4, 4, generator=g)}  # the toy score nets' "context"
    loss, _ = sid_generator_loss(x, torch.full((1, 4), 500.0), torch.randn(x.shape, generator=g), fake=fake,
                                 real=real, cond=ctx, uncond={"context": ctx["context"] * 0.5},
                                 real_guidance_scale=3.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert gen.head.head.weight.grad is not None and gen.head.head.weight.grad.abs().sum() > 0
    assert gen.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
