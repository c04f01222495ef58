"""WanDiT vs diffusers `WanTransformer3DModel` (an independent implementation; test-only dependency).

Checks the key map (both directions, full real configs on meta) and fp32 numerics of T2V and I2V tiny models.
"""

import pytest
import torch

from sfplus.nets.presets import build_dit
from sfplus.weights.diffusers_keys import KeyMapError, diffusers_to_wan, wan_to_diffusers

diffusers = pytest.importorskip("diffusers")
WanTransformer3DModel = diffusers.WanTransformer3DModel


def _diffusers_model(cfg):
    return WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim else None, rope_max_seq_len=cfg.rope_max_positions,
    )


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-i2v-14b-480p"])
def test_key_map_matches_diffusers_on_real_configs(name):
    with torch.device("meta"):
        ours = build_dit(name)
        theirs = _diffusers_model(ours.config)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    mapped = wan_to_diffusers(ours_sd)
    assert set(mapped) == set(theirs_sd)
    assert all(mapped[k].shape == theirs_sd[k].shape for k in mapped)
    back = diffusers_to_wan(theirs_sd)
    assert set(back) == set(ours_sd)


def test_round_trip_is_identity_and_unknown_keys_fail():
    model = build_dit("tiny-i2v")
    sd = model.state_dict()
    sd["img_emb.emb_pos"] = torch.randn(1, 4, 16)  # FLF2V extra
    back = diffusers_to_wan(wan_to_diffusers(sd))
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    assert wan_to_diffusers({"blocks.3.cross_attn.k_img.weight": 0}) == {"blocks.3.attn2.add_k_proj.weight": 0}
    assert wan_to_diffusers({"blocks.0.norm3.bias": 0}) == {"blocks.0.norm2.bias": 0}
    assert diffusers_to_wan({"blocks.1.attn2.norm_added_q.weight": 0, "blocks.1.norm2.weight": 1}) == {
        "blocks.1.norm3.weight": 1}
    with pytest.raises(KeyMapError, match="model.blocks.0.ffn.0.weight"):
        wan_to_diffusers({"model.blocks.0.ffn.0.weight": 0})
    with pytest.raises(KeyMapError, match="blocks.0.norm1.weight"):
        diffusers_to_wan({"blocks.0.norm1.weight": 0})


@pytest.mark.parametrize("i2v", [False, True])
@torch.no_grad()
def test_outputs_match_diffusers_fp32(i2v):
    torch.manual_seed(0)
    # diffusers hard-codes 512 text rows when splitting I2V image tokens, so use text_len 512 for both variants
    ours = build_dit("tiny-i2v" if i2v else "tiny", text_len=512).eval()
    theirs = _diffusers_model(ours.config).eval()
    for p in theirs.parameters():  # perturb every weight (diffusers zero-inits some)
        p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(diffusers_to_wan(theirs.state_dict()), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    t = torch.tensor([37.5, 833.3])
    context = torch.randn(2, 512, 16, generator=g)
    kwargs, their_kwargs, their_x = {}, {}, x
    if i2v:
        y = torch.randn(2, 20, 3, 4, 6, generator=g)
        clip_fea = torch.randn(2, 7, 16, generator=g)
        kwargs = {"clip_fea": clip_fea, "y": y}
        their_kwargs = {"encoder_hidden_states_image": clip_fea}
        their_x = torch.cat([x, y], dim=1)
    out = ours(x, t, context, **kwargs)
    ref = theirs(their_x, t, context, return_dict=False, **their_kwargs)[0]
    assert out.shape == ref.shape == (2, 16, 3, 4, 6)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # exported weights load back into diffusers strictly
    theirs.load_state_dict(wan_to_diffusers(ours.state_dict()), strict=True)
