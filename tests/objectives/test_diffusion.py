"""sfplus.objectives.diffusion: flow matching loss and the reference's bell weighting (docs/algorithms.md, 'Flow
matching')."""

import pytest
import torch
from torch import nn

from sfplus.flow import training_weight
from sfplus.objectives.diffusion import flow_matching_loss

SHAPE = (2, 3, 4, 5, 6)  # [B, C, F, H, W]


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sigma(t):
    return (t.view(-1, 1, 1, 1, 1) if t.dim() == 1 else t.view(t.shape[0], 1, t.shape[1], 1, 1)) / 1000


@pytest.mark.parametrize("t", [torch.tensor([37.0, 912.0]), torch.tensor([[20.0, 300.0, 700.0, 1000.0]] * 2)])
def test_zero_for_oracle(t):
    x0, eps = _randn(0), _randn(1)

    def oracle(x_t, t, **cond):  # exact flow of a point mass at x0: (x_t - x0) / sigma = eps - x0
        return (x_t - x0) / _sigma(t)

    assert flow_matching_loss(oracle, x0, t, eps, {}).item() < 1e-9
    assert flow_matching_loss(oracle, x0, t, eps, {}, weighting_shift=5.0).item() < 1e-9


def test_unweighted_value_and_grad():
    x0, eps = _randn(0), _randn(1)
    t = torch.tensor([250.0, 750.0])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t, *, context):
            return self.a * x + context

    net = Net()
    ctx = _randn(2)
    loss = flow_matching_loss(net, x0, t, eps, {"context": ctx})
    x_t = (1 - _sigma(t)) * x0 + _sigma(t) * eps
    expected = ((0.5 * x_t + ctx - (eps - x0)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    da = (2 * (0.5 * x_t + ctx - (eps - x0)) * x_t).mean()
    assert net.a.grad.item() == pytest.approx(da.item(), rel=1e-4)


def _net_with_frame_error(x0, eps, d):
    """A net whose error is ``d[b, f]`` everywhere in frame f of sample b."""

    def net(x_t, t, **cond):
        return eps - x0 + d.view(d.shape[0], 1, d.shape[1], 1, 1)

    return net


def test_weighting_per_frame_timesteps():
    x0, eps = _randn(0), _randn(1)
    d = torch.tensor([[1.0, 2.0, 0.5, 3.0], [0.1, 1.0, 2.0, 4.0]])
    t = torch.tensor([[1000.0, 500.0, 200.0, 900.0], [100.0, 600.0, 800.0, 999.0]])
    loss = flow_matching_loss(_net_with_frame_error(x0, eps, d), x0, t, eps, {}, weighting_shift=5.0)
    w = training_weight(t.double(), 5.0)
    assert loss.item() == pytest.approx((d.double() ** 2 * w).mean().item(), rel=1e-5)
    # The frame at t=1000 has weight 0: changing its error does not change the loss.
    d2 = d.clone()
    d2[0, 0] = 100.0
    loss2 = flow_matching_loss(_net_with_frame_error(x0, eps, d2), x0, t, eps, {}, weighting_shift=5.0)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)


def test_weighting_per_sample_timesteps():
    x0, eps = _randn(0), _randn(1)
    d = torch.tensor([[1.0, 2.0, 0.5, 3.0], [0.1, 1.0, 2.0, 4.0]])
    t = torch.tensor([500.0, 950.0])
    loss = flow_matching_loss(_net_with_frame_error(x0, eps, d), x0, t, eps, {}, weighting_shift=5.0)
    w = training_weight(t.double(), 5.0).view(2, 1)
    assert loss.item() == pytest.approx((d.double() ** 2 * w).mean().item(), rel=1e-5)
    # Unweighted loss differs (the bell weights are far from 1 at these t).
    plain = flow_matching_loss(_net_with_frame_error(x0, eps, d), x0, t, eps, {})
    assert plain.item() == pytest.approx((d.double() ** 2).mean().item(), rel=1e-5)
    assert abs(plain.item() - loss.item()) > 0.1
