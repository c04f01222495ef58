"""sfplus.sampling.samplers: few-step sampler (docs/algorithms.md, 'Few-step sampler': every step runs) and the CFG
Euler teacher sampler."""

import pytest
import torch

from sfplus.sampling.samplers import euler_sigmas, few_step_sample, teacher_sample

SHAPE = (2, 3, 4, 5, 6)  # [B, C, F, H, W]
STEPS = [1000.0, 937.5, 1000.0 * 5 / 6, 625.0]


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Flow net whose implied x0 is ``x0_of(t, cond)``: ``v = (x_t - x0) / sigma``; records every call."""

    def __init__(self, x0_of):
        self.x0_of = x0_of
        self.calls = []  # (x_t, t, cond) per call

    def __call__(self, x, t, **cond):
        self.calls.append((x.clone(), t.clone(), dict(cond)))
        sigma = t.view(t.shape[0], 1, t.shape[1], 1, 1) / 1000
        return (x - self.x0_of(t, cond)) / sigma


def test_few_step_makes_one_call_per_step_and_returns_last_x0():
    # x0 implied at step t is the constant t/1000: the output tells which step it came from.
    net = Recorder(lambda t, c: torch.full(SHAPE, t[0, 0].item() / 1000))
    out = few_step_sample(net, _randn(0), STEPS, {}, generator=torch.Generator().manual_seed(1))
    assert len(net.calls) == 4
    assert [c[1][0, 0].item() for c in net.calls] == pytest.approx(STEPS)
    for _, t, _ in net.calls:
        assert t.shape == (2, 4) and torch.all(t == t[0, 0])
    torch.testing.assert_close(out, torch.full(SHAPE, 0.625))


def test_few_step_ignores_trailing_zero_and_rejects_empty():
    net = Recorder(lambda t, c: torch.zeros(SHAPE))
    few_step_sample(net, _randn(0), [1000, 750, 0], {})
    assert [c[1][0, 0].item() for c in net.calls] == [1000.0, 750.0]
    with pytest.raises(ValueError):
        few_step_sample(net, _randn(0), [0], {})


def test_few_step_renoises_with_fresh_generator_noise():
    target = _randn(5)
    noise = _randn(0)
    net = Recorder(lambda t, c: target)
    out = few_step_sample(net, noise, STEPS[:2], {"context": torch.ones(2, 7, 3)},
                          generator=torch.Generator().manual_seed(42))
    # Step 0 sees the starting noise, step 1 sees x0 re-noised to t=937.5 with the generator's first draw.
    torch.testing.assert_close(net.calls[0][0], noise)
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(net.calls[1][0], 0.0625 * target + 0.9375 * eps, atol=1e-5, rtol=1e-5)
    # The oracle's x0 comes out exactly; conditioning reached the net as keyword arguments.
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
    assert torch.equal(net.calls[1][2]["context"], torch.ones(2, 7, 3))


def test_few_step_deterministic_given_generator():
    def net(x, t, **c):  # not an oracle: the result depends on the re-noising draws
        return torch.tanh(x) + 0.1

    a = few_step_sample(net, _randn(0), STEPS, {}, generator=torch.Generator().manual_seed(3))
    b = few_step_sample(net, _randn(0), STEPS, {}, generator=torch.Generator().manual_seed(3))
    c = few_step_sample(net, _randn(0), STEPS, {}, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_euler_sigmas():
    assert euler_sigmas(4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert euler_sigmas(4, 5.0) == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.0])
    with pytest.raises(ValueError):
        euler_sigmas(0, 5.0)


class CountingNet:
    def __init__(self):
        self.n = 0
        self.ts = []

    def __call__(self, x, t, **cond):
        self.n += 1
        self.ts.append(t[0, 0].item())
        return 0.1 * x + cond.get("bias", 0.0)


@pytest.mark.parametrize(
    "uncond, scale, calls",
    [(None, 5.0, 3), ({"bias": torch.tensor(1.0)}, 5.0, 6), ({"bias": torch.tensor(1.0)}, 1.0, 3)],
)
def test_teacher_call_counts(uncond, scale, calls):
    net = CountingNet()
    teacher_sample(net, _randn(0), {"bias": torch.tensor(0.0)}, uncond, num_steps=3, shift=1.0, guidance_scale=scale)
    assert net.n == calls
    # Timesteps 1000 * sigma_i for i < num_steps (the final sigma 0 is never evaluated).
    assert sorted(set(net.ts), reverse=True) == pytest.approx([1000.0, 1000 * 2 / 3, 1000 / 3], abs=1e-3)


def test_teacher_cfg_convention_one_step():
    # One Euler step from sigma 1 to 0: x = noise - v with v = v_u + g (v_c - v_u).
    def net(x, t, *, a, b):
        return a * x + b

    noise = _randn(0)
    cond = {"a": torch.tensor(0.5), "b": torch.tensor(1.0)}
    uncond = {"a": torch.tensor(-0.2), "b": torch.tensor(-3.0)}
    g = 4.0
    out = teacher_sample(net, noise, cond, uncond, num_steps=1, shift=5.0, guidance_scale=g)
    v_c, v_u = 0.5 * noise + 1.0, -0.2 * noise - 3.0
    torch.testing.assert_close(out, noise - (v_u + g * (v_c - v_u)))


def test_teacher_oracle_recovers_x0():
    # The exact flow of a point mass at x0 is (x_t - x0) / sigma; Euler integrates it exactly.
    x0 = _randn(9)
    net = Recorder(lambda t, c: x0)
    out = teacher_sample(net, _randn(0), {}, None, num_steps=7, shift=5.0)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_teacher_cfg_oracle_recovers_guided_x0():
    # With point-mass oracles x0_c / x0_u per branch, Wan's CFG integrates to x0_u + g (x0_c - x0_u).
    x0_c, x0_u = _randn(10), _randn(11)
    net = Recorder(lambda t, c: c["x0"])
    g = 3.0
    out = teacher_sample(net, _randn(0), {"x0": x0_c}, {"x0": x0_u}, num_steps=5, shift=3.0, guidance_scale=g)
    torch.testing.assert_close(out, x0_u + g * (x0_c - x0_u), atol=1e-4, rtol=1e-4)
