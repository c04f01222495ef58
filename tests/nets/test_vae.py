"""Wan2.1 VAE (sfplus.nets.vae), its key maps (vae_keys) and the codecs (sfplus.nets.codec).

Tiny same-class VAEs on CPU; the real configuration is only built on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from sfplus.nets.codec import IdentityCodec, StreamDecoder, VideoCodec, WanVAECodec, latent_shape
from sfplus.nets.vae import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    StreamingDecoder,
    VideoShapeError,
    WanVAE,
    load_wan_vae,
)
from sfplus.nets.vae_blocks import CausalConv3d, RMSNorm
from sfplus.weights.vae_keys import VAEKeyError, diffusers_vae_to_wan, wan_vae_to_diffusers
from tests.row_norm_checks import check_kernel_into_view, fused_and_plain_decode, torch_norm_silu_into


def _diffusers_vae_class():
    """diffusers' AutoencoderKLWan, the parity twin; tests that need it skip without diffusers (the GPU image has
    none, and its GPU tests in this file must still run there)."""
    return pytest.importorskip("diffusers").AutoencoderKLWan


# Wan2.1 layout at base dim 8 (strides 4 in time, 8 in space), and a 2-stage variant (time ×2, space ×4).
TINY = dict(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, temporal_downsample=(False, True, True))
TINY_T2 = dict(
    dim=4, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, False),
    latents_mean=(0.1, 0.2, -0.3, 0.4), latents_std=(1.5, 0.5, 2.0, 1.0),
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_norms(module: torch.nn.Module) -> None:
    """RMS-norm gammas start at 1; make them differ so a mixed-up gamma would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _tiny_vae(cfg=TINY, seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(**cfg).eval()
    _randomize_norms(vae)
    return vae


def _video(frames: int, height: int = 16, width: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def _diffusers_twin(cfg: dict):
    torch.manual_seed(0)
    ref = _diffusers_vae_class()(
        base_dim=cfg["dim"], z_dim=cfg["z_dim"], dim_mult=list(cfg["dim_mult"]),
        num_res_blocks=cfg["num_res_blocks"], temperal_downsample=list(cfg["temporal_downsample"]),
    ).eval()  # fmt: skip
    _randomize_norms(ref)
    return ref


# ------------------------------------------------------------------ layout of the published checkpoint


def test_default_config_has_the_published_wan21_layout():
    with torch.device("meta"):
        vae = WanVAE()
    sd = vae.state_dict()
    assert len(sd) == 194
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert sum(p.numel() for p in vae.encoder.parameters()) == 53_595_872
    assert sum(p.numel() for p in vae.decoder.parameters()) == 73_295_331
    assert sum(isinstance(m, CausalConv3d) for m in vae.encoder.modules()) == 26
    assert sum(isinstance(m, CausalConv3d) for m in vae.decoder.modules()) == 33
    expected = {  # docs/wan_architecture.md, 'Layout'
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.0.residual.2.weight": (96, 96, 3, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.middle.1.proj.weight": (384, 384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.residual.0.gamma": (192, 1, 1, 1),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert vae.temporal_stride == 4 and vae.spatial_stride == 8
    assert vae.latents_mean == WAN21_LATENT_MEAN and vae.latents_std == WAN21_LATENT_STD


def test_key_maps_match_diffusers_layout_both_ways():
    with torch.device("meta"):
        wan = {k: tuple(v.shape) for k, v in WanVAE().state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in _diffusers_vae_class()().state_dict().items()}
    assert wan_vae_to_diffusers(wan) == ref
    assert diffusers_vae_to_wan(ref) == wan
    with pytest.raises(VAEKeyError, match="decoder.bogus.weight"):
        wan_vae_to_diffusers({"decoder.bogus.weight": 0})
    with pytest.raises(VAEKeyError, match="encoder.up_blocks"):
        diffusers_vae_to_wan({"encoder.up_blocks.0.weight": 0})


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("cfg", [TINY, TINY_T2], ids=["wan21-layout", "time2-space4"])
def test_parity_with_diffusers(cfg):
    ref = _diffusers_twin(cfg)
    vae = WanVAE(**cfg).eval()
    vae.load_state_dict(diffusers_vae_to_wan(ref.state_dict()), strict=True)
    s, ss = vae.temporal_stride, vae.spatial_stride
    video = _video(1 + 2 * s, 2 * ss, 3 * ss)
    with torch.no_grad():
        z = vae.encode(video)
        # diffusers returns the raw posterior mean; its pipelines normalise outside the model.
        mu = ref.encode(video).latent_dist.mean
        mean = torch.tensor(vae.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1)
        assert z.shape == (2, cfg["z_dim"], 3, 2, 3)
        torch.testing.assert_close(z, (mu - mean) / std, atol=1e-5, rtol=1e-5)

        pixels = vae.decode(z)
        expected = ref.decode(z * std + mean).sample
    assert pixels.shape == video.shape
    assert (pixels.abs() < 1).float().mean() > 0.9  # mostly unclamped, so the comparison means something
    torch.testing.assert_close(pixels, expected, atol=2e-5, rtol=1e-5)


def test_encode_is_causal_in_time():
    """Latent frame k depends only on pixel frames up to 4k: changing later frames leaves it unchanged."""
    vae = _tiny_vae()
    video = _video(9, 16, 16, batch=1)
    edited = video.clone()
    edited[:, :, 5:] = -edited[:, :, 5:]
    with torch.no_grad():
        z, z_edited = vae.encode(video), vae.encode(edited)
    torch.testing.assert_close(z[:, :, :2], z_edited[:, :, :2], atol=0, rtol=0)
    assert (z[:, :, 2] - z_edited[:, :, 2]).abs().max() > 1e-3


def test_decode_shapes_and_range():
    vae = _tiny_vae()
    z = torch.randn(1, 16, 3, 2, 2) * 3
    with torch.no_grad():
        pixels = vae.decode(z)
    assert pixels.shape == (1, 3, 9, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1


@pytest.mark.parametrize("blocks", [(1, 1, 1, 1), (2, 2), (1, 3)])
def test_streaming_decode_matches_whole_decode(blocks):
    vae = _tiny_vae()
    z = torch.randn(1, 16, sum(blocks), 2, 2)
    with torch.no_grad():
        whole = vae.decode(z)
        stream = vae.stream_decoder()
        parts = [stream.decode(b) for b in z.split(list(blocks), dim=2)]
    assert [p.shape[2] for p in parts] == [1 + 4 * (blocks[0] - 1)] + [4 * n for n in blocks[1:]]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)
    assert stream.latent_frames_done == sum(blocks)

    stream.reset()  # a new video starts from an empty cache
    with torch.no_grad():
        torch.testing.assert_close(stream.decode(z[:, :, :1]), whole[:, :, :1], atol=1e-5, rtol=0)


def test_streaming_decode_rejects_shape_change():
    vae = _tiny_vae()
    stream = StreamingDecoder(vae)
    with torch.no_grad():
        stream.decode(torch.randn(1, 16, 1, 2, 2))
        with pytest.raises(VideoShapeError, match="changed mid-stream"):
            stream.decode(torch.randn(1, 16, 1, 2, 4))
        with pytest.raises(VideoShapeError, match=r"\[B, 16, n>=1, h, w\]"):
            stream.decode(torch.randn(1, 8, 1, 2, 2))


def test_bf16_close_to_fp32():
    vae = _tiny_vae()
    vae_bf16 = _tiny_vae().to(torch.bfloat16)
    video = _video(5)
    with torch.no_grad():
        z32 = vae.encode(video)
        z16 = vae_bf16.encode(video.bfloat16())
        p32 = vae.decode(z32)
        p16 = vae_bf16.decode(z32.bfloat16())
    assert z16.dtype == torch.bfloat16 and p16.dtype == torch.bfloat16
    assert z16.shape == z32.shape and p16.shape == p32.shape
    # Relative to the signal: bf16 keeps ~3 significant digits through ~20 layers.
    assert (z16.float() - z32).norm() / z32.norm() < 0.05
    assert (p16.float() - p32).norm() / p32.norm() < 0.05


def test_encode_rejects_bad_shapes():
    vae = _tiny_vae()
    with pytest.raises(VideoShapeError, match=r"1 \+ 4·k frames .* got 8"):
        vae.encode(_video(8))
    with pytest.raises(VideoShapeError, match="multiples of 8"):
        vae.encode(_video(5, 12, 16))
    with pytest.raises(VideoShapeError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))


def test_constructor_validates_config():
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAE(dim=8, dim_mult=(1, 2), temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="z_dim = 4"):
        WanVAE(dim=8, z_dim=4, latents_mean=(0.0,) * 16)


# ------------------------------------------------------------------ loading


def test_load_wan_vae_from_original_and_diffusers_files(tmp_path):
    ref = _diffusers_twin(TINY)
    vae = WanVAE(**TINY).eval()
    vae.load_state_dict(diffusers_vae_to_wan(ref.state_dict()))
    video = _video(5, batch=1)
    with torch.no_grad():
        expected = vae.encode(video)

    torch.save(vae.state_dict(), tmp_path / "vae.pth")  # original (Wan) keys
    ref.save_pretrained(tmp_path / "model" / "vae")  # diffusers folder with config.json
    loaded = [
        load_wan_vae(tmp_path / "vae.pth", **TINY),
        load_wan_vae(tmp_path / "model"),  # config read from vae/config.json
        load_wan_vae(tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors", **TINY),
    ]
    for model in loaded:
        assert not any(p.requires_grad for p in model.parameters())
        # on the CPU: the plain layout and the PyTorch norms (load_wan_vae speeds up CUDA models only)
        assert not model.channels_last and not any(m.fused_kernel for m in model.modules() if isinstance(m, RMSNorm))
        with torch.no_grad():
            torch.testing.assert_close(model.encode(video), expected, atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="vae.pth does not match"):
        load_wan_vae(tmp_path / "vae.pth", **{**TINY, "num_res_blocks": 2})
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_wan_vae(tmp_path / "missing.pth")


# ------------------------------------------------------------------ codecs


def test_identity_codec_round_trip_and_stream():
    codec = IdentityCodec()
    assert isinstance(codec, VideoCodec)
    video = _video(4, 8, 8)
    latents = codec.encode(video)
    assert latents.shape == video.shape
    torch.testing.assert_close(codec.decode(latents), video, atol=0, rtol=0)
    assert latent_shape(codec, 4, 8, 8) == (3, 4, 8, 8)

    stream = codec.stream_decoder()
    assert isinstance(stream, StreamDecoder)
    parts = [stream.decode(b) for b in latents.split([1, 2, 1], dim=2)]
    torch.testing.assert_close(torch.cat(parts, dim=2), video, atol=0, rtol=0)
    assert codec.decode(latents * 3).abs().max() == 1  # decoded pixels are clamped to [-1, 1]
    with pytest.raises(VideoShapeError, match=r"IdentityCodec.encode: expected video \[B, 3, T, H, W\]"):
        codec.encode(torch.zeros(1, 3, 8, 8))


def test_time_pack_codec_stacks_frames_along_channels():
    from sfplus.nets.codec import TimePackCodec

    codec = TimePackCodec(4)
    assert isinstance(codec, VideoCodec)
    video = _video(8, 6, 5, batch=2)
    latents = codec.encode(video)
    assert latents.shape == (2, 12, 2, 6, 5) and latent_shape(codec, 8, 6, 5) == (12, 2, 6, 5)
    # channel c*4 + j of latent frame k is colour c of frame 4k + j
    torch.testing.assert_close(latents[:, 1 * 4 + 2, 1], video[:, 1, 6], atol=0, rtol=0)
    torch.testing.assert_close(codec.decode(latents), video, atol=0, rtol=0)
    stream = codec.stream_decoder()
    torch.testing.assert_close(torch.cat([stream.decode(latents[:, :, :1]), stream.decode(latents[:, :, 1:])], 2),
                               video, atol=0, rtol=0)
    with pytest.raises(VideoShapeError, match="TimePackCodec: a video needs a multiple of 4 frames, got 5"):
        latent_shape(codec, 5, 8, 8)
    with pytest.raises(VideoShapeError, match="a video needs a multiple of 4 frames, got 5"):
        codec.encode(_video(5, 4, 4))
    with pytest.raises(VideoShapeError, match=r"expected latents \[B, 12"):
        codec.decode(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="frames_per_latent"):
        TimePackCodec(0)


def test_wan_vae_codec_adapts_the_vae():
    vae = _tiny_vae()
    codec = WanVAECodec(vae)
    assert isinstance(codec, VideoCodec)
    assert (codec.latent_channels, codec.temporal_stride, codec.spatial_stride) == (16, 4, 8)
    assert latent_shape(codec, 81, 480, 832) == (16, 21, 60, 104)
    video = _video(9, 16, 16, batch=1)
    with torch.no_grad():
        z = codec.encode(video)
        assert z.shape == (1, *latent_shape(codec, 9, 16, 16)) == (1, 16, 3, 2, 2)
        torch.testing.assert_close(z, vae.encode(video), atol=0, rtol=0)
        pixels = codec.decode(z)
        stream = codec.stream_decoder()
        streamed = torch.cat([stream.decode(z[:, :, :1]), stream.decode(z[:, :, 1:])], dim=2)
    assert pixels.shape == video.shape
    torch.testing.assert_close(streamed, pixels, atol=1e-5, rtol=0)


@pytest.mark.parametrize("frames", [2, 4, 8, 10])
def test_wan_vae_codec_rejects_frame_counts_not_1_plus_4k(frames):
    codec = WanVAECodec(_tiny_vae())
    message = rf"WanVAECodec: a video needs 1 \+ 4·k frames \(1, 5, 9, \.\.\.\), got {frames}"
    with pytest.raises(VideoShapeError, match=message):
        codec.encode(_video(frames, 16, 16, batch=1))
    with pytest.raises(VideoShapeError, match=f"got {frames}"):
        latent_shape(codec, frames, 16, 16)
    with pytest.raises(VideoShapeError, match=r"\[B, 16, F>=1, h, w\]"):
        codec.decode(torch.zeros(1, 3, 2, 2, 2))


# ------------------------------------------------------------------ speed paths (same results)


@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
def test_chunked_decode_equals_frame_by_frame(chunk):
    """Several latent frames per decoder call give the frame-by-frame (original) video."""
    vae = _tiny_vae()
    z = torch.randn(1, 16, 6, 2, 3)
    with torch.no_grad():
        reference = StreamingDecoder(vae, chunk_frames=1).decode(z)
        chunked = StreamingDecoder(vae, chunk_frames=chunk).decode(z)
    assert chunked.shape == (1, 3, 21, 16, 24)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)


def test_channels_last_keeps_results():
    vae = _tiny_vae()
    video = _video(5, 16, 16, batch=1)
    z = torch.randn(1, 16, 3, 2, 2)
    with torch.no_grad():
        enc, dec = vae.encode(video), vae.decode(z)
        vae.use_channels_last()
        assert vae.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
        enc_cl, dec_cl = vae.encode(video), vae.decode(z)
    assert dec_cl.is_contiguous()
    torch.testing.assert_close(enc_cl, enc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec_cl, dec, atol=1e-5, rtol=0)
    vae.use_channels_last(False)
    assert vae.decoder.conv1.weight.is_contiguous()


@pytest.mark.parametrize("encode", [False, True])
def test_fused_norm_path_writes_into_the_joined_input(monkeypatch, encode):
    """With the fused kernel's path taken (here its PyTorch twin on the CPU), norm → SiLU → conv writes into the
    convolution's pre-joined input: encode and decode equal the plain path, across chunks and caches."""
    from sfplus.nets import row_norm

    vae = _tiny_vae().use_channels_last().use_fused_norms()
    _randomize_norms(vae)
    video, z = _video(9, 16, 16, batch=2), torch.randn(2, 16, 6, 2, 2)
    with torch.no_grad():
        plain = vae.encode(video) if encode else StreamingDecoder(vae, chunk_frames=2).decode(z)
        calls = []
        monkeypatch.setattr(row_norm, "available", lambda x: True)
        monkeypatch.setattr(row_norm, "rms_norm_silu_into",
                            lambda *a, **k: calls.append(a[2].shape) or torch_norm_silu_into(*a, **k))
        fused = vae.encode(video) if encode else StreamingDecoder(vae, chunk_frames=2).decode(z)
        assert calls, "the fused path was not taken"
        vae.use_fused_norms(False)
        calls.clear()
        assert torch.equal(vae.encode(video) if encode else StreamingDecoder(vae, chunk_frames=2).decode(z), plain)
        assert not calls
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)  # F.rms_norm's eps vs normalize's max()


def test_stream_decoder_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk_frames"):
        StreamingDecoder(_tiny_vae(), chunk_frames=0)


@pytest.mark.gpu
def test_cuda_fast_decode_equals_cpu_decode():
    """On CUDA the loader's defaults (channels-last, cuDNN autotuning, 4-frame chunks) decode the same video."""
    vae = _tiny_vae()
    z = torch.randn(1, 16, 6, 4, 6)
    with torch.no_grad():
        reference = vae.decode(z)
        fast = vae.cuda().use_channels_last().decode(z.cuda()).cpu()
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [96, 192, 384, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_row_norm_kernel_matches_torch(channels, dtype):
    """The Triton kernel against the PyTorch formula, into a view of a bigger buffer, batch 2."""
    from sfplus.nets.row_norm import available

    assert available(torch.empty(1, device="cuda"))
    check_kernel_into_view("cuda", channels, dtype)


@pytest.mark.gpu
def test_load_wan_vae_on_cuda_turns_on_channels_last_and_fused_norms(tmp_path):
    torch.save(_tiny_vae().state_dict(), tmp_path / "vae.pth")
    vae = load_wan_vae(tmp_path / "vae.pth", device="cuda", **TINY)
    assert vae.channels_last
    assert all(m.fused_kernel for m in vae.modules() if isinstance(m, RMSNorm))


@pytest.mark.gpu
def test_cuda_fused_norm_decode_equals_plain_decode():
    fused, plain = fused_and_plain_decode("cuda")
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_row_norm_layout_checks_on_cpu():
    """The fused kernel's host-side checks (no Triton needed): channels-last samples, tail views of a joined buffer."""
    from sfplus.nets.row_norm import _rows_view_ok, available, rms_norm_silu_into

    cl = torch.channels_last_3d
    x = torch.randn(2, 8, 3, 4, 5).contiguous(memory_format=cl)
    joined = torch.empty(2, 8, 5, 4, 5).contiguous(memory_format=cl)
    assert _rows_view_ok(x) and _rows_view_ok(joined[:, :, 2:])
    assert not _rows_view_ok(torch.randn(2, 8, 3, 4, 5))  # channels-first
    assert not _rows_view_ok(x[:, :, :, :, 1:])  # rows with gaps
    assert not available(x)  # CPU: the PyTorch path
    with pytest.raises(ValueError, match="channels-last with dense samples"):
        rms_norm_silu_into(torch.randn(2, 8, 3, 4, 5), torch.ones(8), torch.empty(2, 8, 3, 4, 5))
    with pytest.raises(ValueError, match="differ"):
        rms_norm_silu_into(x, torch.ones(8), joined)
