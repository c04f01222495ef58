"""CLIP image encoder: Wan open-clip <-> HF key map, bit-exact loading, penultimate block, preprocessing.
Tiny configs of the real transformers classes on CPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sfplus.nets.image import (
    CLIP_MEAN,
    CLIP_STD,
    ClipImageEncoder,
    clip_vision_config_from_wan,
    clip_vit_h14_config,
    hf_clip_to_wan,
    preprocess_images,
    wan_clip_to_hf,
)
from sfplus.nets.text import EncoderCheckpointError

transformers = pytest.importorskip("transformers")
CLIPVisionConfig, CLIPVisionModel = transformers.CLIPVisionConfig, transformers.CLIPVisionModel

MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def tiny_config() -> "CLIPVisionConfig":
    # 28 px / patch 14 -> 2x2 patches + CLS = 5 tokens; 3 blocks so that "penultimate" != first or last.
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=16,
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return CLIPVisionModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def wan_sd(hf_model):
    """A Wan open-clip-layout state dict: visual tower from the HF model, plus a text tower to be ignored."""
    sd = {k: v.clone() for k, v in hf_clip_to_wan(hf_model.state_dict()).items()}
    sd["visual.head"] = torch.randn(32, 16)
    sd["textual.token_embedding.weight"] = torch.randn(10, 8)
    sd["textual.head.0.weight"] = torch.randn(8, 8)
    sd["log_scale"] = torch.tensor(2.6)
    return sd


def images(b=2, h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def reference_penultimate(hf_model, imgs):
    with torch.no_grad():
        out = hf_model(pixel_values=preprocess_images(imgs, 28), output_hidden_states=True)
    assert len(out.hidden_states) == 4  # embeddings + 3 blocks
    return out.hidden_states[-2], out.last_hidden_state


def test_key_map_matches_wan_layout_and_inverts(hf_model, wan_sd):
    own = hf_model.state_dict()
    per_block = ["norm1.weight", "norm1.bias", "attn.to_qkv.weight", "attn.to_qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                 "mlp.2.bias"]  # fmt: skip
    expected = {"visual.patch_embedding.weight", "visual.cls_embedding", "visual.pos_embedding",
                "visual.pre_norm.weight", "visual.pre_norm.bias", "visual.post_norm.weight",
                "visual.post_norm.bias", "visual.head"}  # fmt: skip
    expected |= {f"visual.transformer.{i}.{s}" for i in range(3) for s in per_block}
    assert {k for k in wan_sd if k.startswith("visual.")} == expected
    # Shapes and the q, k, v order of the fused projection (docs/wan_architecture.md, 'CLIP key map').
    assert wan_sd["visual.cls_embedding"].shape == (1, 1, 32)
    assert wan_sd["visual.pos_embedding"].shape == (1, 5, 32)
    qkv = wan_sd["visual.transformer.1.attn.to_qkv.weight"]
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in own) else ""
    for i, name in enumerate(["q_proj", "k_proj", "v_proj"]):
        assert torch.equal(qkv[32 * i : 32 * (i + 1)], own[f"{prefix}encoder.layers.1.self_attn.{name}.weight"])

    hf = wan_clip_to_hf(wan_sd)  # text tower and log_scale are ignored
    assert torch.equal(hf.pop("visual_projection.weight"), wan_sd["visual.head"].t())
    assert all(k.startswith("vision_model.") for k in hf)
    hf = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    own = {k.removeprefix("vision_model."): v for k, v in own.items()}
    assert set(hf) == set(own)
    assert all(torch.equal(hf[k], own[k]) for k in own)
    with pytest.raises(EncoderCheckpointError, match="visual.transformer.0.attn.extra"):
        wan_clip_to_hf({**wan_sd, "visual.transformer.0.attn.extra": torch.zeros(1)})


def test_config_read_off_shapes(wan_sd):
    config = clip_vision_config_from_wan(wan_sd, num_heads=2)
    ref = tiny_config()
    for field in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "hidden_act", "projection_dim"]:  # fmt: skip
        assert getattr(config, field) == getattr(ref, field), field
    real = clip_vit_h14_config()
    assert (real.hidden_size, real.num_hidden_layers, real.hidden_act) == (1280, 32, "gelu")


def test_penultimate_block_output_bit_exact(hf_model, wan_sd):
    enc = ClipImageEncoder.from_wan_state_dict(wan_sd, config=tiny_config())
    assert (enc.dim, enc.image_size, enc.num_tokens) == (32, 28, 5)
    assert not any(p.requires_grad for p in enc.parameters())
    imgs = images()
    out = enc.encode(imgs)
    penultimate, last = reference_penultimate(hf_model, imgs)
    assert out.shape == (2, 5, 32) and out.dtype == torch.float32
    assert torch.equal(out, penultimate)
    assert not torch.allclose(out, last)  # the last block really is skipped
    # Wrapping an HF model directly gives the same (the wrapper drops the last block itself).
    assert torch.equal(ClipImageEncoder(copy.deepcopy(hf_model)).encode(imgs), penultimate)
    # A first frame in video layout [B, 3, 1, H, W] is accepted.
    assert torch.equal(enc.encode(imgs[:, :, None]), out)


def test_loads_from_files(hf_model, wan_sd, tmp_path):
    imgs = images(b=1, seed=1)
    penultimate, _ = reference_penultimate(hf_model, imgs)
    torch.save(wan_sd, tmp_path / "models_clip_tiny.pth")
    enc = ClipImageEncoder.load(tmp_path / "models_clip_tiny.pth", num_heads=2)
    assert torch.equal(enc.encode(imgs), penultimate)
    hf_model.save_pretrained(tmp_path / "image_encoder")
    enc_hf = ClipImageEncoder.load(tmp_path / "image_encoder")
    assert torch.equal(enc_hf.encode(imgs), penultimate)
    with pytest.raises(FileNotFoundError, match="no_such_clip.pth"):
        ClipImageEncoder.load(tmp_path / "no_such_clip.pth")
    torch.save({"textual.x": torch.zeros(1)}, tmp_path / "text_only.pth")
    with pytest.raises(EncoderCheckpointError, match="text_only.pth.*no 'visual"):
        ClipImageEncoder.load(tmp_path / "text_only.pth")


def test_missing_key_is_listed(wan_sd):
    broken = dict(wan_sd)
    del broken["visual.transformer.1.attn.to_qkv.bias"], broken["visual.pre_norm.weight"]
    with pytest.raises(EncoderCheckpointError, match="missing keys") as err:
        ClipImageEncoder.from_wan_state_dict(broken, config=tiny_config(), source="my_clip.pth")
    msg = str(err.value)
    assert "my_clip.pth" in msg and "visual.transformer.1.attn.to_qkv.bias" in msg and "visual.pre_norm.weight" in msg


def test_preprocessing_shape_and_range():
    imgs = images(b=3, h=48, w=80)
    x = preprocess_images(imgs)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    # Constant images stay constant: -1 -> (0 - mean) / std, +1 -> (1 - mean) / std, 0 -> (0.5 - mean) / std.
    for value, unit in [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5)]:
        out = preprocess_images(torch.full((1, 3, 30, 50), value))
        assert torch.allclose(out, ((unit - MEAN) / STD).expand_as(out), atol=1e-5)
    # Squash, not crop: a horizontal ramp keeps both ends (a centre crop of a 1:2 image would cut them off).
    ramp = torch.linspace(-1, 1, 100).view(1, 1, 1, 100).expand(1, 3, 50, 100)
    unit = preprocess_images(ramp) * STD + MEAN
    assert unit[..., 0].max() < 0.02 and unit[..., -1].min() > 0.98
    # [-1, 1] input lands in [0, 1] before normalisation, up to the bicubic overshoot.
    unit = x * STD + MEAN
    assert unit.min() > -0.3 and unit.max() < 1.3 and unit.min() < 0.1 and unit.max() > 0.9
    # The resize is bicubic without antialias (what Wan calls).
    ref = F.interpolate(imgs, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    assert torch.allclose(unit, ref, atol=1e-5)


def test_bad_inputs_and_frozen_mode(hf_model):
    enc = ClipImageEncoder(copy.deepcopy(hf_model))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        enc.encode(images() * 127.5 + 127.5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc.encode(torch.zeros(2, 4, 28, 28))
    enc.train()
    assert not enc.training and not enc.model.training


def test_real_vit_h14_layout_on_meta():
    # Wan's visual tower (docs/wan_architecture.md, 'CLIP image encoder'): 632,076,800 parameters with the 1280x1024
    # head; 31 of 32 blocks are used.
    with torch.device("meta"):
        model = CLIPVisionModel(clip_vit_h14_config())
    wan = hf_clip_to_wan(model.state_dict())
    wan["visual.head"] = torch.empty(1280, 1024, device="meta")
    assert len(wan) == 392 and sum(v.numel() for v in wan.values()) == 632_076_800
    enc = ClipImageEncoder.from_wan_state_dict(wan)  # config read off the shapes, 16 heads
    assert (enc.dim, enc.image_size, enc.num_tokens, enc.model.config.num_hidden_layers) == (1280, 224, 257, 31)
