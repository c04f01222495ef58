"""sfplus.sampling.unipc: UniPC (bh2) flow sampler: parity with diffusers' UniPCMultistepScheduler, exactness."""

import numpy as np
import pytest
import torch

from sfplus.sampling.unipc import FlowUniPC, unipc_sample, unipc_sigmas

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 5, 6)


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class FakeNet:
    """A smooth nonlinear flow that depends on x, t and the cond ("context" scales it); records calls."""

    def __init__(self):
        self.calls = []
        self.w = _randn(11, (1, 3, 1, 1, 1)) * 0.5

    def __call__(self, x, t, context):
        self.calls.append((t.clone(), context))
        tt = t.view(-1, 1, t.shape[1], 1, 1).float() / 1000
        return torch.tanh(self.w * x) * (1.5 - tt) + context.view(-1, 1, 1, 1, 1) * (0.3 + tt) * x.mean()


COND = {"context": torch.tensor([1.0, -0.5])}
UNCOND = {"context": torch.tensor([0.2, 0.2])}


def _diffusers_sample(net, noise, num_steps, shift, guidance, order, sigmas=None):
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=shift, solver_order=order)
    if sigmas is None:
        sched.set_timesteps(num_steps)
    else:
        sched.set_timesteps(sigmas=sigmas)
    x = noise.clone()
    for t in sched.timesteps:
        tt = torch.full((x.shape[0], x.shape[2]), float(t))
        v = net(x, tt, **COND)
        if guidance is not None:
            v_u = net(x, tt, **UNCOND)
            v = v_u + guidance * (v - v_u)
        x = sched.step(v, t, x).prev_sample
    return x, sched


@pytest.mark.parametrize("num_steps,shift,guidance,order", [(12, 5.0, 5.0, 2), (7, 3.0, None, 2), (9, 8.0, 4.0, 3),
                                                            (3, 1.0, None, 1)])
def test_parity_with_diffusers(num_steps, shift, guidance, order):
    noise = _randn(0)
    ref, sched = _diffusers_sample(FakeNet(), noise, num_steps, shift, guidance, order)
    assert unipc_sigmas(num_steps, shift, "diffusers") == pytest.approx(sched.sigmas.double().tolist(), abs=1e-7)
    net = FakeNet()
    ours = unipc_sample(net, noise, COND, UNCOND if guidance else None, num_steps=num_steps, shift=shift,
                        guidance_scale=guidance or 1.0, order=order, schedule="diffusers")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # same integer timesteps as diffusers feeds the net, cond then uncond
    fed = [c[0][0, 0].item() for c in net.calls[:: 2 if guidance else 1]]
    assert fed == [float(t) for t in sched.timesteps]


def test_wan_schedule_parity():
    """Official Wan: linspace(0.999 (float32), 0, N + 1)[:-1] then shift — diffusers stepping on those sigmas."""
    num_steps, shift = 10, 5.0
    unshifted = np.linspace(float(np.float32(0.999)), 0.0, num_steps + 1)[:-1]
    noise = _randn(1)
    ref, sched = _diffusers_sample(FakeNet(), noise, num_steps, shift, 5.0, 2, sigmas=unshifted)
    sig = unipc_sigmas(num_steps, shift, "wan")
    assert sig[0] == pytest.approx(5 * 0.999 / (1 + 4 * 0.999), abs=1e-7) and sig[-1] == 0
    assert FlowUniPC(num_steps, shift).timesteps == [float(t) for t in sched.timesteps]
    ours = unipc_sample(FakeNet(), noise, COND, UNCOND, num_steps=num_steps, shift=shift, guidance_scale=5.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order,schedule", [(1, "wan"), (2, "wan"), (3, "diffusers")])
def test_oracle_net_recovers_x0(order, schedule):
    """An exact flow ``v = eps - x0`` keeps every sample on the path ``(1-σ) x0 + σ eps``: the result is x0.

    The solver treats its input as the sample at sigmas[0] (0.9998 for Wan at shift 5, not 1): start on the path."""
    x0, eps = _randn(2), _randn(3)
    s0 = unipc_sigmas(6, 5.0, schedule)[0]
    start = (1 - s0) * x0 + s0 * eps

    def oracle(x, t, **cond):
        return eps - x0

    out = unipc_sample(oracle, start, {}, None, num_steps=6, shift=5.0, guidance_scale=1.0, order=order,
                       schedule=schedule)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)

    # the same with an oracle that reads sigma off the (exact) timestep: v = (x - x0) / sigma
    def oracle_t(x, t, **cond):
        return (x - x0) / (t.view(-1, 1, t.shape[1], 1, 1).double() / 1000).float()

    out = unipc_sample(oracle_t, start, {}, None, num_steps=6, shift=5.0, guidance_scale=1.0, order=order,
                       schedule=schedule, integer_timesteps=False)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_call_counts_and_errors():
    net = FakeNet()
    unipc_sample(net, _randn(0), COND, None, num_steps=5, shift=5.0, guidance_scale=5.0)
    assert len(net.calls) == 5
    net = FakeNet()
    unipc_sample(net, _randn(0), COND, UNCOND, num_steps=5, shift=5.0, guidance_scale=5.0)
    assert len(net.calls) == 10 and net.calls[1][1] is UNCOND["context"]
    net = FakeNet()
    unipc_sample(net, _randn(0), COND, UNCOND, num_steps=5, shift=5.0, guidance_scale=1.0)
    assert len(net.calls) == 5
    solver = FlowUniPC(1, 5.0)
    solver.step(torch.zeros(SHAPE), torch.zeros(SHAPE))
    with pytest.raises(RuntimeError, match="already made its 1 steps"):
        solver.step(torch.zeros(SHAPE), torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="unknown UniPC schedule 'karras'"):
        unipc_sigmas(4, 5.0, "karras")
    with pytest.raises(ValueError, match="num_steps"):
        unipc_sigmas(0, 5.0)
