"""sfplus.conditioning.i2v: Wan I2V conditioning (docs/wan_architecture.md, 'I2V conditioning'), batched."""

import numpy as np
import pytest
import torch

from sfplus.conditioning.i2v import ImageReadError, i2v_condition, i2v_mask, load_image, resize_image, wan_i2v_size
from sfplus.nets.codec import VideoShapeError, WanVAECodec
from sfplus.nets.vae import WanVAE

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return WanVAECodec(WanVAE(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1).eval())


@pytest.fixture(scope="module")
def clip():
    from sfplus.nets.image import ClipImageEncoder

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=14)
    return ClipImageEncoder(transformers.CLIPVisionModel(config).eval())


def _images(b, h=16, w=24, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_wan_i2v_size():
    # official Wan's float quirk: sqrt(480·832·480/832) = 479.99999999999994 → 59 latents → 58 (patch multiple)
    assert wan_i2v_size(480, 832, 480 * 832) == (464, 832)
    assert wan_i2v_size(480, 832, 480 * 832, rounding="nearest") == (480, 832)
    assert wan_i2v_size(1080, 1920, 480 * 832) == (464, 832)  # sqrt(399360·0.5625) = 474 → 59 → 58
    assert wan_i2v_size(720, 1280, 720 * 1280, rounding="nearest") == (720, 1280)
    assert wan_i2v_size(600, 800, 480 * 832, spatial_stride=16, patch=1) == (544, 720)  # 34, 45 latents
    h, w = wan_i2v_size(1000, 1000, 480 * 832)
    assert h == w and h % 16 == 0 and h * w <= 480 * 832
    with pytest.raises(ValueError, match="too small"):
        wan_i2v_size(480, 832, 100)


def test_mask_layout_81_frames():
    m = i2v_mask(21, 60, 104)
    assert m.shape == (4, 21, 60, 104)
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()
    # Wan's construction (docs/wan_architecture.md, 'I2V conditioning'), literally: ones [1, 81], frames 1.. zeroed,
    # frame 0 repeated 4x, view, transpose
    ref = torch.ones(1, 81, 60, 104)
    ref[:, 1:] = 0
    ref = torch.cat([ref[:, :1].repeat(1, 4, 1, 1), ref[:, 1:]], dim=1).view(1, 21, 4, 60, 104).transpose(1, 2)[0]
    assert torch.equal(m, ref)
    assert i2v_mask(3, 2, 2, temporal_stride=2).shape == (2, 3, 2, 2)


def test_load_image_both_backends_and_errors(tmp_path):
    from PIL import Image

    rgba = (np.random.RandomState(0).rand(10, 14, 4) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "img.png")
    for backend in ("pil", "ffmpeg", None):
        img = load_image(tmp_path / "img.png", backend=backend)
        assert img.shape == (3, 10, 14) and img.dtype == torch.float32
        expected = torch.from_numpy(rgba[..., :3].astype(np.float32)).permute(2, 0, 1) / 255 * 2 - 1
        torch.testing.assert_close(img, expected)
    with pytest.raises(FileNotFoundError, match="no_such.png"):
        load_image(tmp_path / "no_such.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for backend in ("pil", "ffmpeg"):
        with pytest.raises(ImageReadError, match="bad.png"):
            load_image(tmp_path / "bad.png", backend=backend)


def test_resize_image_bicubic():
    img = _images(1, 10, 14)[0]
    out = resize_image(img, 16, 24)
    assert out.shape == (3, 16, 24)
    ref = torch.nn.functional.interpolate(img[None], size=(16, 24), mode="bicubic", align_corners=False)[0]
    assert torch.equal(out, ref)
    assert resize_image(_images(2, 10, 14), 8, 8).shape == (2, 3, 8, 8)
    assert torch.equal(resize_image(img, 10, 14), img)


def test_condition_shapes_and_content(codec, clip):
    images = _images(2)
    cond = i2v_condition(images, codec, clip, 9)
    y, clip_fea = cond["y"], cond["clip_fea"]
    assert y.shape == (2, 4 + 16, 3, 2, 3) and clip_fea.shape == (2, 5, 32)
    assert torch.equal(y[:, :4], i2v_mask(3, 2, 3).expand(2, -1, -1, -1, -1))
    video = torch.zeros(2, 3, 9, 16, 24)
    video[:, :, 0] = images
    with torch.no_grad():
        torch.testing.assert_close(y[:, 4:], codec.encode(video))
        torch.testing.assert_close(clip_fea, clip.encode(images))
    other = i2v_condition(images, codec, clip, 9, clip_images=_images(2, 20, 30, seed=3))
    assert torch.equal(other["y"], y) and (other["clip_fea"] - clip_fea).abs().max() > 1e-4
    assert "clip_fea" not in i2v_condition(images, codec, None, 9)


def test_batch_of_two_equals_two_batches_of_one(codec, clip):
    images = _images(2, seed=4)
    both = i2v_condition(images, codec, clip, 5)
    for i in range(2):
        one = i2v_condition(images[i:i + 1], codec, clip, 5)
        for key in ("y", "clip_fea"):
            torch.testing.assert_close(both[key][i:i + 1], one[key], atol=1e-5, rtol=1e-5)
    assert (both["y"][0, 4:] - both["y"][1, 4:]).abs().max() > 1e-4  # the samples really differ


def test_condition_errors(codec, clip):
    with pytest.raises(VideoShapeError, match="1 \\+ 4·k frames"):
        i2v_condition(_images(1), codec, clip, 8)
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        i2v_condition(_images(1) * 100, codec, clip, 5)
    with pytest.raises(ValueError, match="expected images"):
        i2v_condition(_images(1)[0], codec, clip, 5)
