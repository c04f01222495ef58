"""sfplus.rollout.bidirectional: backward simulation with a gradient through the exit step only (docs/algorithms.md,
'Backward simulation (bidirectional rollout)')."""

import pytest
import torch
from torch import nn

from sfplus.rollout.bidirectional import bidirectional_rollout
from sfplus.sampling.samplers import few_step_sample

SHAPE = (2, 3, 4, 5, 6)  # [B, C, F, H, W]
STEPS = [1000.0, 937.5, 1000.0 * 5 / 6, 625.0]


def _randn(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


class ScaleNet(nn.Module):
    """``v = w * x``, recording for each call its input, timestep and whether a graph is being recorded."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append((x.detach().clone(), t.clone(), torch.is_grad_enabled()))
        return self.w * x


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_calls_grad_and_bounds(k):
    net = ScaleNet()
    r = bidirectional_rollout(net, _randn(0), STEPS + [0.0], {}, k, generator=torch.Generator().manual_seed(1))
    assert r.calls == k + 1 and len(net.calls) == k + 1 and r.exit_index == k
    assert [c[2] for c in net.calls] == [False] * k + [True]
    assert [c[1][0, 0].item() for c in net.calls] == pytest.approx(STEPS[: k + 1])
    assert r.t_from == pytest.approx(STEPS[k])
    assert r.t_to == pytest.approx(STEPS[k + 1] if k < 3 else 0.0)
    assert r.x0.requires_grad and r.x0.shape == SHAPE

    # The graph covers the exit call only: x0 = x_k - sigma_k * w * x_k with x_k detached, so
    # d sum(x0) / dw = -sigma_k * sum(x_k). Earlier calls joining the graph would add terms.
    r.x0.sum().backward()
    x_k = net.calls[-1][0]
    expected = -(STEPS[k] / 1000) * x_k.double().sum()
    assert net.w.grad.double().item() == pytest.approx(expected.item(), rel=1e-4)


def test_no_grad_mode():
    net = ScaleNet()
    r = bidirectional_rollout(net, _randn(0), STEPS, {}, 2, grad=False)
    assert not r.x0.requires_grad
    assert [c[2] for c in net.calls] == [False, False, False]


def test_full_rollout_equals_few_step_sampler():
    net = ScaleNet()
    cond = {"context": torch.zeros(2, 3, 8)}
    r = bidirectional_rollout(net, _randn(0), STEPS, cond, 3, generator=torch.Generator().manual_seed(11))
    s = few_step_sample(net, _randn(0), STEPS, cond, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(r.x0.detach(), s)


@pytest.mark.parametrize("bad", [-1, 4, 5])
def test_bad_exit_index(bad):
    net = ScaleNet()
    with pytest.raises(ValueError, match=str(bad)):
        bidirectional_rollout(net, _randn(0), STEPS + [0.0], {}, bad)
    assert net.calls == []  # rejected before any evaluation
