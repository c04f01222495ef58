"""sfplus.flow: timestep warp, noising/conversions, score-timestep sampling and the loss weight (docs/algorithms.md,
'Flow matching', 'Score timesteps')."""

import pytest
import torch

from sfplus.flow import (
    add_noise,
    expand_t,
    flow_to_x0,
    sample_score_timesteps,
    sample_training_timesteps,
    shift_sigma,
    sigma_of,
    training_weight,
    unwarp_timestep,
    warp_timesteps,
    x0_to_flow,
)


# ---- warp / unwarp (docs/algorithms.md, 'Flow matching' table) -------------------------------------------------------
@pytest.mark.parametrize(
    "shift, expected",
    [
        (5.0, [1000.0, 937.5, 1000.0 * 5 / 6, 625.0, 0.0]),
        (8.0, [1000.0, 960.0, 8000.0 / 9, 8000.0 / 11, 0.0]),
        (3.0, [1000.0, 900.0, 750.0, 500.0, 0.0]),
    ],
)
def test_warp_matches_spec_table(shift, expected):
    got = warp_timesteps([1000, 750, 500, 250, 0], shift)
    assert got == pytest.approx(expected, abs=1e-9)
    # The table's rounded values, as printed in the spec.
    if shift == 5.0:
        assert round(got[2], 3) == 833.333
    if shift == 8.0:
        assert (round(got[2], 3), round(got[3], 3)) == (888.889, 727.273)


def test_warp_shift_one_is_identity():
    assert warp_timesteps([1000, 750, 333, 1], 1.0) == pytest.approx([1000, 750, 333, 1])


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("k", [0, 1, 20, 250, 500, 750, 907, 999, 1000])
def test_unwarp_inverts_warp(shift, k):
    (t,) = warp_timesteps([k], shift)
    assert unwarp_timestep(t, shift) == pytest.approx(k, abs=1e-9)


def test_unwarp_known_values():
    assert unwarp_timestep(937.5, 5.0) == pytest.approx(750.0)
    assert unwarp_timestep(625.0, 5.0) == pytest.approx(250.0)


@pytest.mark.parametrize("bad", [-1, 1000.5, 2000])
def test_warp_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=str(bad)):
        warp_timesteps([1000, bad], 5.0)


def test_shift_sigma_endpoints_and_monotone():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    out = shift_sigma(s, 5.0)
    assert out[0] == 0 and out[-1] == 1
    assert torch.all(out[1:] > out[:-1])
    assert torch.all(out[1:-1] > s[1:-1])  # a shift > 1 pushes towards noise


# ---- expand_t ---------------------------------------------------------------------------------------------
def test_expand_t_shapes():
    x = torch.zeros(2, 3, 4, 5, 6)
    assert expand_t(torch.tensor([1.0, 2.0]), x).shape == (2, 1, 1, 1, 1)
    assert expand_t(torch.ones(2, 4), x).shape == (2, 1, 4, 1, 1)
    assert expand_t(torch.tensor(7.0), x).shape == (2, 1, 1, 1, 1)
    # Per-frame values land on their frame.
    t = torch.arange(8.0).view(2, 4)
    assert torch.equal(expand_t(t, x)[1, 0, :, 0, 0], t[1])


@pytest.mark.parametrize("shape", [(3,), (2, 5), (3, 4), (2, 4, 1), (1,)])
def test_expand_t_rejects_bad_shapes(shape):
    x = torch.zeros(2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="timesteps"):
        expand_t(torch.ones(shape), x)


# ---- noising and conversions ------------------------------------------------------------------------------
def _video(seed, shape=(2, 3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def test_add_noise_formula_per_frame():
    x0, eps = _video(0), _video(1)
    t = torch.tensor([[0.0, 250.0, 600.0, 1000.0], [20.0, 980.0, 500.0, 1.0]])
    x_t = add_noise(x0, eps, t)
    for b in range(2):
        for f in range(4):
            s = t[b, f].item() / 1000
            torch.testing.assert_close(x_t[b, :, f], (1 - s) * x0[b, :, f] + s * eps[b, :, f])
    # Endpoints: t=0 is the data, t=1000 is the noise.
    torch.testing.assert_close(x_t[0, :, 0], x0[0, :, 0])
    torch.testing.assert_close(x_t[0, :, 3], eps[0, :, 3])


def test_add_noise_keeps_dtype():
    x0, eps = _video(0).bfloat16(), _video(1).bfloat16()
    assert add_noise(x0, eps, torch.tensor([500.0, 500.0])).dtype == torch.bfloat16


def test_conversions_are_consistent():
    x0, eps = _video(2), _video(3)
    t = torch.tensor([[20.0, 300.0, 700.0, 980.0], [1000.0, 937.5, 833.3, 625.0]])
    x_t = add_noise(x0, eps, t)
    flow = eps - x0  # the flow-matching target
    torch.testing.assert_close(flow_to_x0(x_t, flow, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_to_flow(x_t, x0, t), flow, atol=2e-4, rtol=1e-4)
    # Round trip flow -> x0 -> flow for an arbitrary (non-target) flow.
    v = _video(4)
    torch.testing.assert_close(x0_to_flow(x_t, flow_to_x0(x_t, v, t), t), v, atol=2e-4, rtol=1e-4)


def test_sigma_of_is_continuous():
    t = torch.tensor([0.0, 19.69, 500.0, 1000.0])
    torch.testing.assert_close(sigma_of(t), t / 1000)


# ---- score timesteps (docs/algorithms.md, 'Score timesteps') ---------------------------------------------------------
def test_score_timesteps_range_shape_and_constant_frames():
    g = torch.Generator().manual_seed(0)
    t = sample_score_timesteps(4096, 5, generator=g, shift=5.0)
    assert t.shape == (4096, 5) and t.dtype == torch.float32
    assert t.min() >= 20 and t.max() <= 980
    assert torch.all(t == t[:, :1])


def test_score_timesteps_clamp_fractions_at_shift5():
    # t_raw in 908..999 (92 of 1000 values) shifts above 980, t_raw in 0..4 (5 values) below 20.
    g = torch.Generator().manual_seed(1234)
    t = sample_score_timesteps(200_000, 1, generator=g, shift=5.0)[:, 0]
    top = (t == 980).float().mean().item()
    bottom = (t == 20).float().mean().item()
    assert top == pytest.approx(0.092, abs=0.004)
    assert bottom == pytest.approx(0.005, abs=0.0015)
    assert t.median().item() == pytest.approx(833.3, abs=3.0)


def test_score_timesteps_no_shift_are_clamped_integers():
    g = torch.Generator().manual_seed(5)
    t = sample_score_timesteps(20_000, 1, generator=g, shift=1.0)
    assert torch.all(t == t.round())
    assert t.min() == 20 and t.max() == 980  # 0..19 and 981..999 are drawn and clamped


def test_score_timesteps_bounds_are_unwarped():
    # ts_schedule(_max) example of docs/algorithms.md, 'Score timesteps': t_raw in [500, 750) -> t in [833.3, 937.5).
    g = torch.Generator().manual_seed(3)
    t = sample_score_timesteps(5000, 2, generator=g, shift=5.0, min_t=500, max_t=750)
    assert t.min() >= 833.33 and t.max() < 937.5
    assert t.min() < 835 and t.max() > 936  # the whole interval is reached


def test_score_timesteps_deterministic_with_seeded_generator():
    a = sample_score_timesteps(64, 3, generator=torch.Generator().manual_seed(7), shift=5.0)
    torch.manual_seed(999)  # the global RNG must not matter
    b = sample_score_timesteps(64, 3, generator=torch.Generator().manual_seed(7), shift=5.0)
    c = sample_score_timesteps(64, 3, generator=torch.Generator().manual_seed(8), shift=5.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_score_timesteps_empty_range_errors():
    with pytest.raises(ValueError, match="500"):
        sample_score_timesteps(2, 1, min_t=500, max_t=500)


def test_training_timesteps_positive_and_shifted():
    g = torch.Generator().manual_seed(0)
    t = sample_training_timesteps(50_000, generator=g, shift=5.0)
    assert t.shape == (50_000,) and t.min() > 0 and t.max() <= 1000
    # sigma = shift(u), u ~ U(0,1): the median is shift(0.5) = 5/6.
    assert t.median().item() == pytest.approx(1000 * 5 / 6, abs=5.0)


# ---- training weight (docs/algorithms.md, 'Flow matching') -----------------------------------------------------------
def _grid(shift):
    lin = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    return 1000 * shift_sigma(lin, shift)


@pytest.mark.parametrize("shift", [3.0, 5.0, 8.0])
def test_training_weight_mean_one_zero_at_1000(shift):
    w = training_weight(_grid(shift), shift)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-9)
    assert training_weight(torch.tensor([1000.0], dtype=torch.float64), shift).item() == pytest.approx(0, abs=1e-12)
    assert torch.all(w >= 0)


def test_training_weight_peak_at_500_shift5():
    grid = _grid(5.0)
    w = training_weight(grid, 5.0)
    assert w.max().item() == pytest.approx(2.08, abs=0.005)
    assert grid[w.argmax()].item() == pytest.approx(500, abs=1.0)
    w500 = training_weight(torch.tensor([500.0]), 5.0)
    assert w500.dtype == torch.float32 and w500.item() == pytest.approx(2.0764, abs=1e-3)
    # Symmetric bell around 500.
    pair = training_weight(torch.tensor([300.0, 700.0], dtype=torch.float64), 5.0)
    assert pair[0].item() == pytest.approx(pair[1].item(), rel=1e-12)
