"""sfplus.objectives.causvid: simulated generator inputs and the (teacher-forced) generator step (docs/algorithms.md,
'CausVid')."""

import pytest
import torch

from sfplus.flow import add_noise, predict_x0
from sfplus.nets.causal import BlockCausal
from sfplus.nets.presets import build_dit
from sfplus.objectives.causvid import causvid_generator_output, simulate_generator_inputs
from sfplus.objectives.timesteps import block_ranges

STEPS = [1000.0, 937.5, 833.33, 625.0]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_inputs_shapes_and_per_block_timesteps():
    x = _randn(8, 3, 7, 2, 2)
    x_in, t = simulate_generator_inputs(x, STEPS, frames_per_block=3, independent_first_frame=True,
                                        generator=torch.Generator().manual_seed(1))
    assert x_in.shape == x.shape and x_in.dtype == x.dtype and t.shape == (8, 7) and t.dtype == torch.float32
    assert set(t.unique().tolist()) <= set(torch.tensor(STEPS).tolist())
    for start, stop in block_ranges(7, frames_per_block=3, independent_first_frame=True):
        assert torch.equal(t[:, start:stop], t[:, start:start + 1].expand(-1, stop - start))
    assert (t[:, 1] != t[:, 4]).any() and (t[:, 0] != t[0, 0]).any()
    # reproducible from the generator alone
    again = simulate_generator_inputs(x, STEPS, frames_per_block=3, independent_first_frame=True,
                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x_in) and torch.equal(again[1], t)


def test_single_step_is_add_noise_at_that_step():
    x, n = _randn(2, 3, 4, 2, 2), _randn(2, 3, 4, 2, 2, seed=1)
    x_in, t = simulate_generator_inputs(x, [625.0], frames_per_block=2, noise=n)
    assert torch.all(t == 625.0)
    assert torch.equal(x_in, add_noise(x, n, torch.full((2, 4), 625.0)))
    torch.testing.assert_close(x_in, 0.375 * x + 0.625 * n)
    x_in, _ = simulate_generator_inputs(x, [0.0], frames_per_block=2, noise=n)
    assert torch.equal(x_in, x)  # a 0 step means clean
    with pytest.raises(ValueError, match="noise"):
        simulate_generator_inputs(x, STEPS, frames_per_block=2, noise=n[:1])
    with pytest.raises(ValueError, match="denoising steps"):
        simulate_generator_inputs(x, [1200.0], frames_per_block=2)


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = build_dit(name)
    model.init_weights()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.2)
    return model


def _case(name, frames):
    b = 2
    data = {"x": _randn(b, 16, frames, 4, 4, seed=3), "noise": _randn(b, 16, frames, 4, 4, seed=4),
            "cond": {"context": _randn(b, 5, 16, seed=5)}}
    if name.endswith("i2v"):
        data["cond"]["clip_fea"] = _randn(b, 3, 16, seed=6)
        data["cond"]["y"] = _randn(b, 20, frames, 4, 4, seed=7)
    return data


def _run(model, d, causal, tf, seed=11):
    return causvid_generator_output(model, d["x"], STEPS, d["cond"], causal, torch.Generator().manual_seed(seed),
                                    teacher_forcing=tf, noise=d["noise"])


@pytest.mark.parametrize("name,causal,frames", [
    ("tiny", BlockCausal(2), 6),
    ("tiny-i2v", BlockCausal(2, independent_first_frame=True), 5),
])
def test_generator_output_and_teacher_forcing(name, causal, frames):
    model = _model(name)
    d = _case(name, frames)
    out = _run(model, d, causal, tf=False)
    x_in, t = simulate_generator_inputs(d["x"], STEPS, frames_per_block=causal.frames_per_block,
                                        independent_first_frame=causal.independent_first_frame,
                                        generator=torch.Generator().manual_seed(11), noise=d["noise"])
    with torch.no_grad():
        ref = predict_x0(lambda x, tt, **c: model(x, tt, **c, causal=causal), x_in, t, d["cond"])
    assert out.shape == d["x"].shape
    torch.testing.assert_close(out.detach(), ref)

    tf = _run(model, d, causal, tf=True)
    ranges = block_ranges(frames, frames_per_block=causal.frames_per_block,
                          independent_first_frame=causal.independent_first_frame)
    s0 = ranges[0][1]
    torch.testing.assert_close(tf[:, :, :s0], out[:, :, :s0], atol=1e-5, rtol=1e-5)  # block 0: no context
    assert not torch.allclose(tf[:, :, s0:], out[:, :, s0:], atol=1e-4)  # later blocks see clean context
    # Block j under teacher forcing == parallel causal forward of [clean frames < j at t = 0, noisy block j]
    with torch.no_grad():
        for start, stop in ranges[1:]:
            mixed = torch.cat([d["x"][:, :, :start], x_in[:, :, start:stop]], dim=2)
            t_mixed = torch.cat([torch.zeros(2, start), t[:, start:stop]], dim=1)
            cond = dict(d["cond"])
            if "y" in cond:
                cond["y"] = cond["y"][:, :, :stop]
            want = predict_x0(lambda x, tt, **c: model(x, tt, **c, causal=causal), mixed, t_mixed, cond)
            torch.testing.assert_close(tf[:, :, start:stop].detach(), want[:, :, start:stop], atol=1e-5, rtol=1e-5)
    tf.square().mean().backward()
    assert model.blocks[1].self_attn.q.weight.grad.abs().sum() > 0


def test_bidirectional_generator_uses_one_step_per_sample():
    model = _model("tiny")
    d = _case("tiny", 4)
    calls = []

    def net(x, t, **kw):
        calls.append((t.clone(), kw.get("causal", "none")))
        return model(x, t, **kw)

    causvid_generator_output(net, d["x"], STEPS, d["cond"], None, torch.Generator().manual_seed(0))
    (t, causal), = calls
    assert causal == "none" and torch.equal(t, t[:, :1].expand_as(t))
    with pytest.raises(ValueError, match="causal generator"):
        causvid_generator_output(model, d["x"], STEPS, d["cond"], None, teacher_forcing=True)
    # Parallel teacher forcing needs only a net that takes clean_x; the windowed KV-cache path needs a WanDiT.
    calls.clear()
    causvid_generator_output(net, d["x"], STEPS, d["cond"], BlockCausal(2), teacher_forcing=True)
    assert len(calls) == 1 and isinstance(calls[0][1], BlockCausal)
    with pytest.raises(ValueError, match="WanDiT"):
        causvid_generator_output(net, d["x"], STEPS, d["cond"], BlockCausal(2, local_window_frames=2),
                                 teacher_forcing=True)
