"""sfplus.objectives.ode: ODE-regression inputs and loss (docs/algorithms.md, 'ODE regression')."""

import pytest
import torch
from torch import nn

from sfplus.nets.causal import BlockCausal
from sfplus.nets.presets import build_dit
from sfplus.objectives.ode import ode_regression_inputs, ode_regression_loss
from sfplus.objectives.timesteps import block_ranges

B, K, C, F, H, W = 3, 4, 2, 7, 2, 2
STEPS = [1000.0, 900.0, 750.0, 0.0]  # K - 1 warped steps, then the clean end


def _trajectory(seed=0):
    return torch.randn(B, K, C, F, H, W, generator=torch.Generator().manual_seed(seed))


class AffineNet(nn.Module):
    """``v = a * x + context`` plus ``bump`` on frames whose timestep is 0; records the causal kwarg."""

    def __init__(self, a=0.3, bump=0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.bump = bump
        self.seen_causal = "unset"

    def forward(self, x, t, *, context, causal=None):
        self.seen_causal = causal
        return self.a * x + context + self.bump * (t == 0).float().view(x.shape[0], 1, -1, 1, 1)


def _loss(net, traj, seed=1, **kw):
    kw.setdefault("frames_per_block", 2)
    kw.setdefault("independent_first_frame", True)
    return ode_regression_loss(net, traj, STEPS, {"context": torch.full((1, C, 1, 1, 1), 0.1)},
                               generator=torch.Generator().manual_seed(seed), **kw)


def test_inputs_gather_per_block_snapshots():
    traj = _trajectory()
    x_in, t, k = ode_regression_inputs(traj, STEPS, frames_per_block=2, independent_first_frame=True,
                                       generator=torch.Generator().manual_seed(1))
    assert x_in.shape == (B, C, F, H, W) and t.shape == (B, F) and k.shape == (B, F)
    for start, stop in block_ranges(F, frames_per_block=2, independent_first_frame=True):
        assert torch.equal(k[:, start:stop], k[:, start:start + 1].expand(-1, stop - start))
    for b in range(B):
        for f in range(F):
            assert torch.equal(x_in[b, :, f], traj[b, k[b, f], :, f])
            assert t[b, f].item() == STEPS[k[b, f]]
    _, _, k2 = ode_regression_inputs(traj, STEPS, frames_per_block=2, independent_first_frame=True,
                                     generator=torch.Generator().manual_seed(1), i2v_first_frame=True)
    assert torch.all(k2[:, 0] == K - 1) and torch.equal(k2[:, 1:], k[:, 1:])


def test_loss_by_hand_over_noisy_frames_only():
    traj = _trajectory()
    net = AffineNet()
    loss = _loss(net, traj)
    x_in, t, _ = ode_regression_inputs(traj, STEPS, frames_per_block=2, independent_first_frame=True,
                                       generator=torch.Generator().manual_seed(1))
    s = t.view(B, 1, F, 1, 1) / 1000
    x0 = x_in - s * (0.3 * x_in + 0.1)
    err = (x0 - traj[:, -1]) ** 2  # [B, C, F, H, W]
    keep = (t != 0)
    assert keep.any() and (~keep).any()  # this seed has both clean-context and noisy frames
    expected = err.permute(0, 2, 1, 3, 4)[keep].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(err.mean().item(), rel=1e-3)  # not diluted by the clean frames
    assert net.seen_causal is None  # no causal layout given → full attention call
    loss.backward()
    assert net.a.grad is not None and net.a.grad != 0


def test_loss_ignores_clean_frames():
    traj = _trajectory()
    base = _loss(AffineNet(), traj)
    assert _loss(AffineNet(bump=1e3), traj).item() == base.item()
    # while the clean end, the target of the noisy frames, does matter
    traj2 = traj.clone()
    traj2[:, -1] += 1.0
    assert _loss(AffineNet(), traj2).item() != base.item()


def test_all_clean_gives_zero_on_the_graph():
    traj = _trajectory()
    net = AffineNet()
    loss = ode_regression_loss(net, traj, [0.0] * K, {"context": torch.zeros(1)}, frames_per_block=2)
    assert loss.item() == 0.0
    loss.backward()
    assert net.a.grad is not None and net.a.grad == 0


def test_causal_generator_and_layout_checks():
    torch.manual_seed(0)
    gen = build_dit("tiny")
    gen.init_weights()
    traj = torch.randn(2, K, 16, 5, 4, 4, generator=torch.Generator().manual_seed(2))
    cond = {"context": torch.randn(2, 5, 16)}
    causal = BlockCausal(2, independent_first_frame=True)
    loss = ode_regression_loss(gen, traj, STEPS, cond, frames_per_block=2, independent_first_frame=True,
                               causal=causal, generator=torch.Generator().manual_seed(0), i2v_first_frame=True)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert gen.blocks[0].ffn[0].weight.grad is not None
    net = AffineNet()
    _loss(net, _trajectory(), causal=BlockCausal(2, independent_first_frame=True))
    assert net.seen_causal == BlockCausal(2, independent_first_frame=True)
    with pytest.raises(ValueError, match="differs"):
        _loss(AffineNet(), _trajectory(), causal=BlockCausal(3))
    with pytest.raises(ValueError, match="snapshots"):
        ode_regression_loss(AffineNet(), _trajectory(), STEPS[:-1], {"context": torch.zeros(1)}, frames_per_block=2)
    with pytest.raises(ValueError, match=r"\[B, K, C, F, H, W\]"):
        ode_regression_loss(AffineNet(), _trajectory()[0], STEPS, {"context": torch.zeros(1)}, frames_per_block=2)
