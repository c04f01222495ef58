"""DiscriminatorHead on WanDiT hidden states (docs/algorithms.md, 'GAN term (DMD2)') and WanDiT's `return_hidden`
option."""

import pytest
import torch

from sfplus.nets.discriminator import DiscriminatorHead, GanAttentionBlock
from sfplus.nets.presets import build_dit
from sfplus.objectives.gan import discriminator_logits


def _critic(seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_dit("tiny", **overrides)
    model.init_weights()
    with torch.no_grad():
        model.head.head.weight.normal_(std=0.2)
    return model


def _data(b=2, frames=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 16, frames, 4, 4, generator=g), torch.full((b, frames), 400.0),
            {"context": torch.randn(b, 5, 16, generator=g)})


def test_return_hidden_keeps_the_flow_and_returns_block_outputs():
    model = _critic()
    x, t, cond = _data()
    plain = model(x, t, **cond)
    flow, hidden = model(x, t, **cond, return_hidden=(0, 1))
    assert torch.equal(flow, plain)
    assert set(hidden) == {0, 1, "e"}
    assert hidden[0].shape == (2, 2 * 2 * 2, 32) and hidden["e"].shape == (2, 2, 32)
    assert not torch.equal(hidden[0], hidden[1])
    # the last block's output through the model's own head is the flow
    again = model.unpatchify(model.head(hidden[1], hidden["e"]), (2, 2, 2))
    torch.testing.assert_close(again, flow)
    with pytest.raises(ValueError, match="outside"):
        model(x, t, **cond, return_hidden=(2,))


@pytest.mark.parametrize("dim,heads", [(32, 2), (48, 3)])
@pytest.mark.parametrize("time_token", [False, True])
def test_head_any_width_and_gradients(dim, heads, time_token):
    critic = _critic(dim=dim, num_heads=heads, ffn_dim=2 * dim)
    head = DiscriminatorHead(dim, heads, 2, tokens_per_block=2, ffn_dim=64, time_token=time_token)
    x, t, cond = _data()
    logits = discriminator_logits(critic, head, x, t, cond, blocks=(0, 1))
    assert logits.shape == (2,) and logits.dtype == torch.float32
    assert logits[0] != logits[1]
    logits.sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert critic.blocks[0].self_attn.q.weight.grad.abs().sum() > 0  # and the critic trunk


def test_head_returns_flow_too_and_depends_on_the_selected_blocks():
    critic = _critic()
    head = DiscriminatorHead(32, 2, 1)
    x, t, cond = _data()
    logits, flow = discriminator_logits(critic, head, x, t, cond, blocks=(1,), return_flow=True)
    assert torch.equal(flow, critic(x, t, **cond))
    assert not torch.allclose(logits, discriminator_logits(critic, head, x, t, cond, blocks=(0,)))


def test_multi_class_and_errors():
    head = DiscriminatorHead(32, 2, 2, num_classes=3, time_token=True)
    h = [torch.randn(2, 8, 32), torch.randn(2, 8, 32)]
    assert head(h, torch.randn(2, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="time embedding"):
        head(h)
    with pytest.raises(ValueError, match="expects 2 hidden"):
        head(h[:1], torch.randn(2, 32))
    with pytest.raises(ValueError, match="dim=32"):
        head([torch.randn(2, 8, 16)] * 2, torch.randn(2, 32))
    with pytest.raises(ValueError, match="not divisible"):
        DiscriminatorHead(30, 4, 1)
    with pytest.raises(ValueError, match="num_blocks"):
        DiscriminatorHead(32, 2, 0)
    with pytest.raises(ValueError, match="critic blocks"):
        discriminator_logits(_critic(), DiscriminatorHead(32, 2, 2), *_data(), blocks=(1,))


def test_gan_attention_block_reads_the_hidden_states():
    torch.manual_seed(0)
    blk = GanAttentionBlock(32, 2, 64)
    tok = torch.randn(2, 3, 32)
    h = torch.randn(2, 10, 32)
    out = blk(tok, h)
    assert out.shape == (2, 3, 32)
    assert not torch.allclose(out, blk(tok, h + torch.randn_like(h)))
    # no self-attention between register tokens: each token's output depends on its own input only
    tok2 = tok.clone()
    tok2[:, 0] += 1.0
    torch.testing.assert_close(blk(tok2, h)[:, 1:], out[:, 1:])


def test_bf16_head_on_fp32_hidden():
    head = DiscriminatorHead(32, 2, 1).to(torch.bfloat16)
    out = head([torch.randn(2, 8, 32)])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_classifier_layernorm_eps_is_the_references():
    """The reference's `_cls_pred_branch` LayerNorm keeps torch's default eps (1e-5); reference_check found sfplus's
    1e-6 as a 5e-6 relative gradient difference of the GAN generator term."""
    head = DiscriminatorHead(16, 2, 3)
    assert head.cls_pred_branch[0].eps == 1e-5
    assert head.gan_blocks[0].norm3.eps == 1e-6  # the GAN blocks' WanLayerNorms keep Wan's 1e-6


def test_default_head_is_the_references():
    """The reference's head (its RegisterTokens / GanAttentionBlock): a learnable weight on the register tokens'
    RMSNorm, no affine on the blocks' norm2, FFN 8192 wide whatever the width."""
    for dim, heads in ((16, 2), (64, 4)):
        head = DiscriminatorHead(dim, heads, 3)
        names = dict(head.named_parameters())
        assert names["register_norm.weight"].shape == (dim,)
        assert not any(".norm2." in k for k in names)
        assert all(b.ffn[0].out_features == 8192 and b.ffn[2].in_features == 8192 for b in head.gan_blocks)
        assert head.layout() == {"ffn_dim": 8192, "register_norm_weight": True, "norm2_affine": False}
        assert DiscriminatorHead.layout_of(head.state_dict()) == head.layout()
    assert DiscriminatorHead(16, 2, 1, ffn_dim=None).gan_blocks[0].ffn[0].out_features == 64  # None: 4 x width


def test_register_norm_weight_scales_the_normalised_tokens():
    torch.manual_seed(0)
    head = DiscriminatorHead(16, 2, 2, ffn_dim=32)
    h = [torch.randn(2, 8, 16), torch.randn(2, 8, 16)]
    with torch.no_grad():
        head.register_norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    reg = head.register_tokens
    expected = reg * torch.rsqrt(reg.pow(2).mean(-1, keepdim=True) + 1e-6) * head.register_norm.weight
    torch.testing.assert_close(head.register_norm(reg), expected)
    before = head(h)
    with torch.no_grad():
        head.register_norm.weight.mul_(3.0)
    assert not torch.allclose(head(h), before)


def test_old_head_options_rebuild_the_pre_alignment_head():
    """register_norm_weight=False, norm2_affine=True, ffn_dim=None: the keys of heads saved before the alignment
    (tests/data/distill_causal_gan_session6.ckpt); at unit norms it computes what the reference-layout head does."""
    torch.manual_seed(0)
    old = DiscriminatorHead(32, 2, 2, ffn_dim=None, register_norm_weight=False, norm2_affine=True)
    keys = set(old.state_dict())
    assert "register_norm.weight" not in keys and {"gan_blocks.0.norm2.weight", "gan_blocks.0.norm2.bias"} <= keys
    assert old.gan_blocks[0].ffn[0].weight.shape == (128, 32)
    assert DiscriminatorHead.layout_of({f"disc_head.{k}": v for k, v in old.state_dict().items()}, "disc_head.") == {
        "ffn_dim": 128, "register_norm_weight": False, "norm2_affine": True}
    new = DiscriminatorHead(32, 2, 2, ffn_dim=128)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert missing == ["register_norm.weight"] and all(".norm2." in k for k in unexpected)
    h = [torch.randn(2, 8, 32), torch.randn(2, 8, 32)]
    torch.testing.assert_close(new(h), old(h))  # norm2 1 / 0 and register-norm weight 1: the same function
    with torch.no_grad():
        old.gan_blocks[0].norm2.weight.mul_(2.0)
    assert not torch.allclose(new(h), old(h))  # an affine norm2 is one
