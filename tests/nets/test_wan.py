"""WanDiT (bidirectional mode): keys, shapes, RoPE/time-embedding formulas, numerics conventions, input errors."""

import math

import pytest
import torch

from sfplus.nets.presets import build_dit
from sfplus.nets.rope import apply_rope, rope_cos_sin, rope_split
from sfplus.nets.wan import WanConfig, WanDiT, sinusoidal_embedding


def _model(name="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_dit(name, **overrides)
    model.init_weights()
    with torch.no_grad():  # a non-zero head so outputs depend on everything
        model.head.head.weight.normal_(std=0.2)
    return model


def _inputs(b=2, f=3, h=4, w=6, c=16, text_len=5, text_dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, f, h, w, generator=g), torch.rand(b, generator=g) * 1000,
            torch.randn(b, text_len, text_dim, generator=g))


def _expected_keys(num_layers: int, image: bool) -> set[str]:
    """Wan-original state-dict keys, written out from docs/wan_architecture.md, 'State dict'."""
    keys = {"patch_embedding.weight", "patch_embedding.bias", "time_projection.1.weight", "time_projection.1.bias",
            "head.modulation", "head.head.weight", "head.head.bias"}
    keys |= {f"{m}.{i}.{p}" for m in ("text_embedding", "time_embedding") for i in (0, 2) for p in ("weight", "bias")}
    for i in range(num_layers):
        blk = f"blocks.{i}"
        keys |= {f"{blk}.modulation", f"{blk}.norm3.weight", f"{blk}.norm3.bias"}
        for attn in ("self_attn", "cross_attn"):
            keys |= {f"{blk}.{attn}.{n}.{p}" for n in "qkvo" for p in ("weight", "bias")}
            keys |= {f"{blk}.{attn}.norm_q.weight", f"{blk}.{attn}.norm_k.weight"}
        keys |= {f"{blk}.ffn.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
        if image:
            keys |= {f"{blk}.cross_attn.{n}.{p}" for n in ("k_img", "v_img") for p in ("weight", "bias")}
            keys.add(f"{blk}.cross_attn.norm_k_img.weight")
    if image:
        keys |= {f"img_emb.proj.{j}.{p}" for j in (0, 1, 3, 4) for p in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("name,image", [("tiny", False), ("tiny-i2v", True)])
def test_state_dict_keys_are_wan_original_and_load_strict(name, image):
    model = _model(name)
    sd = model.state_dict()
    assert set(sd) == _expected_keys(model.config.num_layers, image)
    per_block = 32 if image else 27
    assert len(sd) == per_block * model.config.num_layers + 15 + (8 if image else 0)
    d, cfg = model.config.dim, model.config
    assert sd["patch_embedding.weight"].shape == (d, cfg.in_dim, 1, 2, 2)
    assert sd["blocks.0.modulation"].shape == (1, 6, d) and sd["head.modulation"].shape == (1, 2, d)
    assert sd["head.head.weight"].shape == (4 * cfg.out_dim, d)
    other = build_dit(name)
    other.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    x, t, ctx = _inputs(b=1, c=16)
    kw = {"clip_fea": torch.randn(1, 257, 16), "y": torch.randn(1, 20, 3, 4, 6)} if image else {}
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, **kw), other(x, t, ctx, **kw))


def test_forward_shapes_dtype_and_any_grid():
    model = _model()
    for f, h, w in [(1, 2, 2), (3, 4, 6), (5, 8, 2)]:
        x, t, ctx = _inputs(f=f, h=h, w=w)
        out = model(x, t, ctx)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_rope_matches_complex_float64_reference():
    d, grid, offset = 16, (3, 4, 5), 7
    t_dim, h_dim, w_dim = rope_split(d)
    assert (t_dim, h_dim, w_dim) == (8, 4, 4) and rope_split(128) == (44, 42, 42)

    def table(n, dim):  # official rope_params, complex128
        return torch.polar(torch.ones(n, dim // 2, dtype=torch.float64),
                           torch.outer(torch.arange(n, dtype=torch.float64),
                                       1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)))

    f, h, w = grid
    ft, fh, fw = table(64, t_dim)[offset:offset + f], table(64, h_dim)[:h], table(64, w_dim)[:w]
    freqs = torch.cat([ft[:, None, None].expand(f, h, w, -1), fh[None, :, None].expand(f, h, w, -1),
                       fw[None, None].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    x = torch.randn(2, f * h * w, 3, d)
    ref = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, -1, 3, d // 2, 2)) * freqs).flatten(3)
    cos, sin = rope_cos_sin(grid, d, frame_offset=offset)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref.float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rope_max_positions|out of range"):
        rope_cos_sin(grid, d, frame_offset=1022, max_positions=1024)


def test_sinusoidal_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = sinusoidal_embedding(t, 8)
    k = torch.arange(4, dtype=torch.float64)
    angles = t.double()[:, None] * 10000 ** (-k / 4)
    torch.testing.assert_close(emb, torch.cat([angles.cos(), angles.sin()], 1).float())


def test_context_is_zero_padded_and_padding_is_attended():
    model = _model()
    x, t, ctx = _inputs(text_len=5)
    padded = torch.cat([ctx, torch.zeros(2, 3, 16)], dim=1)  # text_len = 8
    with torch.no_grad():
        out, out_padded = model(x, t, ctx), model(x, t, padded)
        torch.testing.assert_close(out, out_padded, atol=0, rtol=0)
        # padded rows are attended: attending only to the 5 real rows (a text_len=5 model) differs
        short = build_dit("tiny", text_len=5)
        short.load_state_dict(model.state_dict())
        assert (short(x, t, ctx) - out).abs().max() > 1e-4


def test_per_frame_timesteps_equal_scalar_and_modulate_per_frame():
    model = _model()
    x, t, ctx = _inputs(f=3)
    with torch.no_grad():
        scalar = model(x, t, ctx)
        per_frame = model(x, t[:, None].expand(2, 3), ctx)
        torch.testing.assert_close(per_frame, scalar, atol=1e-6, rtol=1e-6)
        t2 = t[:, None].repeat(1, 3)
        t2[:, 2] = 0.0
        changed = model(x, t2, ctx)
    assert (changed - scalar).abs().amax(dim=(0, 1, 3, 4))[2] > 1e-4


def test_unpatchify_channel_order():
    """Token (f, h, w) output index ((pt·2 + ph)·2 + pw)·C + c lands at [c, f, 2h+ph, 2w+pw]."""
    model = _model()
    f, h, w, c = 2, 3, 2, model.config.out_dim
    out = torch.arange(f * h * w * 4 * c, dtype=torch.float32).view(1, f * h * w, 4 * c)
    video = model.unpatchify(out, (f, h, w))
    for (fi, hi, wi, ph, pw, ci) in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 1, 0, 5), (0, 1, 1, 1, 1, 15)]:
        token = (fi * h + hi) * w + wi
        assert video[0, ci, fi, 2 * hi + ph, 2 * wi + pw] == out[0, token, (ph * 2 + pw) * c + ci]


def test_bf16_weights_run_linears_in_bf16_and_stay_close_to_fp32():
    model = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx)
        out = model.to(torch.bfloat16)(x, t, ctx)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05  # bf16 matmuls (not bit-equal), fp32 modulation/head keep it close


def test_gradients_reach_every_parameter():
    model = _model("tiny-i2v")
    x, t, ctx = _inputs(b=1)
    out = model(x, t, ctx, clip_fea=torch.randn(1, 4, 16), y=torch.randn(1, 20, 3, 4, 6))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_init_weights_follows_spec():
    model = build_dit("toy")
    model.init_weights()
    assert torch.count_nonzero(model.head.head.weight) == 0
    assert abs(model.text_embedding[0].weight.std().item() - 0.02) < 0.005
    lin = model.blocks[0].self_attn.q
    bound = math.sqrt(6 / (lin.in_features + lin.out_features))
    assert lin.weight.abs().max() <= bound and torch.count_nonzero(lin.bias) == 0
    mod = torch.stack([b.modulation for b in model.blocks])
    assert abs(mod.std().item() * math.sqrt(model.config.dim) - 1) < 0.1
    assert all(torch.equal(b.norm3.weight, torch.ones(64)) for b in model.blocks)


def test_config_validation_and_input_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        WanConfig(dim=30, ffn_dim=8, num_heads=4, num_layers=1)
    model = _model()
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(x[..., :5], t, ctx)
    with pytest.raises(ValueError, match="in_dim=16"):
        model(x[:, :15], t, ctx)
    with pytest.raises(ValueError, match="text_len=8"):
        model(x, t, torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match="per-frame"):
        model(x, torch.zeros(2, 2), ctx)
    with pytest.raises(ValueError, match="clip_fea"):
        model(x, t, ctx, clip_fea=torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="clip_fea"):
        _model("tiny-i2v")(x, t, ctx, y=torch.randn(2, 20, 3, 4, 6))


def test_meta_build_has_no_storage():
    with torch.device("meta"):
        model = WanDiT(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2))
    assert all(p.is_meta for p in model.parameters())


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the float32 copies of bfloat16 tensors made while active."""

    def __init__(self):
        super().__init__()
        self.upcasts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 \
                and kwargs.get("dtype") == torch.float32:
            self.upcasts += 1
        return func(*args, **kwargs)


def test_linears_under_autocast_leave_bf16_activations_to_autocast(monkeypatch):
    """fp32 master weights under bf16 autocast: a bf16 activation goes straight to autocast's cast (an fp32 copy
    first only costs memory: 1.1 GiB per FFN at 1.3B/480x832x81), with the same outputs and gradients."""
    from sfplus.nets import wan

    model = _model()
    x, t, ctx = _inputs(b=1)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, ctx)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    counter = _CountCasts()
    with counter:
        out, grads = run()
    upcasts = counter.upcasts  # the rest are wanted: fp32 norms, the fp32 residual stream, fp32 grads

    def upcasting_linear(layer, h):  # what run_linear did before: cast to the weight dtype, then autocast casts back
        return layer(h.to(layer.weight.dtype))

    monkeypatch.setattr(wan, "run_linear", upcasting_linear)
    counter = _CountCasts()
    with counter:
        old_out, old_grads = run()
    # each Linear fed a bf16 activation (attention outputs, the FFN's hidden state, ...) made one fp32 copy in the
    # forward and one more for its gradient in the backward: 109 copies against 87 for the tiny net
    assert counter.upcasts > upcasts
    torch.testing.assert_close(out, old_out, rtol=0, atol=0)
    for g, old in zip(grads, old_grads):
        torch.testing.assert_close(g, old, rtol=0, atol=0)
