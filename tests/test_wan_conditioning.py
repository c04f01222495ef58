"""WanConditioner: folder resolution (Wan-AI and diffusers names, explicit paths, errors naming the file), lazy
loading, text / negative / decode / I2V conditioning from a tiny "Wan folder" in the published layout (tiny UMT5,
tokenizer, VAE and CLIP of the real classes, written with the Wan key names), and T5 offloading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sfplus.conditioning.i2v import i2v_condition
from sfplus.conditioning.wan import (
    CLIP_FILE,
    T5_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    WAN_I2V_NEGATIVE_PROMPT,
    WAN_NEGATIVE_PROMPT,
    WanConditioner,
    resolve_wan_files,
)
from sfplus.nets.codec import WanVAECodec
from sfplus.nets.image import ClipImageEncoder
from sfplus.nets.text import UMT5TextEncoder
from sfplus.nets.vae import load_wan_vae
from tests.helpers import TINY_VAE as VAE_CFG
from tests.helpers import write_tiny_wan_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    """A tiny Wan2.1-I2V-like folder with the published file names and Wan key layouts."""
    return write_tiny_wan_folder(tmp_path_factory.mktemp("Wan2.1-tiny"))


def conditioner(wan_dir: Path, **kw) -> WanConditioner:
    kw = {"vae_config": VAE_CFG, "clip_num_heads": 2, "text_dtype": "fp32", **kw}
    return WanConditioner(model_dir=str(wan_dir), **kw)


def images(b: int = 2, h: int = 16, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------- resolution


def test_files_resolve_from_the_wan_folder_and_explicit_paths_win(wan_dir, tmp_path):
    files = resolve_wan_files(wan_dir, i2v=True)
    assert (files.t5, files.tokenizer, files.vae, files.clip) == (
        wan_dir / T5_FILE, wan_dir / TOKENIZER_DIR, wan_dir / VAE_FILE, wan_dir / CLIP_FILE)
    assert resolve_wan_files(wan_dir).clip is None  # text-to-video needs no CLIP file
    other_vae = tmp_path / "my_vae.pth"
    other_vae.write_bytes(b"")
    assert resolve_wan_files(wan_dir, vae=other_vae).vae == other_vae
    # No folder at all: every path explicit.
    explicit = resolve_wan_files(t5=wan_dir / T5_FILE, tokenizer=wan_dir / TOKENIZER_DIR, vae=wan_dir / VAE_FILE)
    assert explicit.t5 == wan_dir / T5_FILE


def test_diffusers_layout_is_found(tmp_path):
    for name in ("text_encoder", "tokenizer", "vae", "image_encoder"):
        (tmp_path / name).mkdir()
    files = resolve_wan_files(tmp_path, i2v=True)
    assert (files.t5.name, files.tokenizer.name, files.vae.name, files.clip.name) == (
        "text_encoder", "tokenizer", "vae", "image_encoder")


def test_missing_files_are_named(wan_dir, tmp_path):
    for name in (T5_FILE, VAE_FILE):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / TOKENIZER_DIR).mkdir(parents=True)
    WanConditioner(model_dir=str(tmp_path))  # text-to-video: complete
    with pytest.raises(FileNotFoundError, match=f"clip not found in {tmp_path}.*{CLIP_FILE}"):
        WanConditioner(model_dir=str(tmp_path), i2v=True)
    with pytest.raises(FileNotFoundError, match="vae .*no_such_vae.pth does not exist"):
        WanConditioner(model_dir=str(wan_dir), vae=str(tmp_path / "no_such_vae.pth"))
    with pytest.raises(FileNotFoundError, match="model_dir .*not_a_folder is not a folder"):
        WanConditioner(model_dir=str(tmp_path / "not_a_folder"))
    with pytest.raises(FileNotFoundError, match="no t5 path given and no model_dir"):
        WanConditioner()


def test_bad_settings_are_named(wan_dir):
    with pytest.raises(ValueError, match="num_pixel_frames must be 1 \\+ 4k.*80"):
        conditioner(wan_dir, num_pixel_frames=80)
    with pytest.raises(ValueError, match="text_dtype .*'half'"):
        conditioner(wan_dir, text_dtype="half")


# ---------------------------------------------------------------------------------------------------- encoding


def test_text_negative_and_codec_match_the_encoders_loaded_directly(wan_dir):
    cond = conditioner(wan_dir)
    assert cond.text_encoder is None and cond.codec is None  # nothing is read before first use
    assert cond.negative_prompt == WAN_NEGATIVE_PROMPT
    prompts = ["a red square moves left", "two dogs run"]
    ctx = cond.text(prompts)["context"]
    t5 = UMT5TextEncoder.load(wan_dir / T5_FILE, wan_dir / TOKENIZER_DIR, dtype=torch.float32)
    assert ctx.shape == (2, 512, 32) and ctx.dtype == torch.float32
    assert torch.equal(ctx, t5.encode(prompts))
    neg = cond.negative(3)["context"]
    assert neg.shape == (3, 512, 32) and torch.equal(neg[2], t5.encode([WAN_NEGATIVE_PROMPT])[0])
    assert cond.negative(3)["context"] is neg  # cached

    vae = load_wan_vae(wan_dir / VAE_FILE, **VAE_CFG)
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = cond.encode_video(video)
    assert latents.shape == (1, 16, 2, 2, 2)
    torch.testing.assert_close(latents, vae.encode(video), rtol=0, atol=0)
    torch.testing.assert_close(cond.decode(latents), vae.decode(latents), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"i2v=False\) has no image encoder"):
        cond.image_condition(images())


def test_image_condition_is_batched_i2v_condition(wan_dir):
    cond = conditioner(wan_dir, i2v=True, num_pixel_frames=5)
    assert cond.negative_prompt == WAN_I2V_NEGATIVE_PROMPT and cond.negative_prompt.startswith("镜头晃动，")
    imgs = images(2)
    out = cond.image_condition(imgs)
    assert set(out) == {"clip_fea", "y"}
    assert out["clip_fea"].shape == (2, 5, 32) and out["clip_fea"].dtype == torch.float32
    assert out["y"].shape == (2, 4 + 16, 2, 2, 3)  # 5 frames -> 2 latent frames; 16x24 px -> 2x3
    assert (out["y"][:, :4, 0] == 1).all() and (out["y"][:, :4, 1:] == 0).all()  # the first-frame mask

    clip = ClipImageEncoder.load(wan_dir / CLIP_FILE, num_heads=2)
    codec = WanVAECodec(load_wan_vae(wan_dir / VAE_FILE, **VAE_CFG))
    ref = i2v_condition(imgs, codec, clip, 5)
    for key in ("clip_fea", "y"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    # Rows are independent: a batch gives each image what it gets alone.
    one = cond.image_condition(imgs[1:])
    torch.testing.assert_close(one["y"][0], out["y"][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one["clip_fea"][0], out["clip_fea"][1], rtol=1e-5, atol=1e-5)
    # A custom negative prompt is kept as given, for I2V too.
    assert conditioner(wan_dir, i2v=True, negative_prompt="blurry").negative_prompt == "blurry"


def test_offloaded_text_encoder_stays_out_of_the_module_tree(wan_dir):
    cond = conditioner(wan_dir, offload_text_encoder=True).load()
    assert cond.text_encoder is None
    assert not any(isinstance(m, UMT5TextEncoder) for m in cond.modules())
    assert not any(k.startswith("text_encoder") for k in cond.state_dict())
    cond.to(torch.float64)  # what a device move does to the tree; the offloaded T5 must not follow
    t5 = cond._offloaded_text_encoder
    assert next(t5.parameters()).dtype == torch.float32
    assert cond.text(["a cat"])["context"].shape == (1, 512, 32)
    # Not offloaded: T5 is a frozen submodule like the VAE.
    plain = conditioner(wan_dir).load()
    assert isinstance(plain.text_encoder, UMT5TextEncoder)
    assert not any(p.requires_grad for p in plain.parameters())
    plain.train()
    assert not plain.training and not plain.text_encoder.training


def test_from_modules_wraps_built_encoders(wan_dir):
    t5 = UMT5TextEncoder.load(wan_dir / T5_FILE, wan_dir / TOKENIZER_DIR, dtype=torch.float32)
    codec = WanVAECodec(load_wan_vae(wan_dir / VAE_FILE, **VAE_CFG))
    cond = WanConditioner.from_modules(t5, codec, negative_prompt="", num_pixel_frames=5)
    assert cond.text(["a cat"])["context"].shape == (1, 512, 32)
    assert cond.negative(1)["context"].shape == (1, 512, 32)
    with pytest.raises(ValueError, match="no image encoder"):
        cond.image_condition(images())


# ---------------------------------------------------------------------------------------------------- recipes


def test_cli_fit_and_predict_with_a_wan_folder(wan_dir, tmp_path, capsys):
    """The conditioner as a config builds it (jsonargparse), trains a tiny T2V DMD and writes decoded MP4s."""
    import yaml

    from sfplus.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat sits on a mat\ntwo dogs run in the park\n")
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "sfplus.callbacks.AtomicCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt")}},
                                  {"class_path": "sfplus.callbacks.VideoWriter",
                                   "init_args": {"output_dir": str(tmp_path / "videos")}}]},
        "model": {"class_path": "sfplus.modules.DistillModule", "init_args": {
            "net": "tiny", "net_overrides": {"in_dim": 16, "out_dim": 16, "text_dim": 32, "text_len": 512},
            "conditioner": {"class_path": "sfplus.conditioning.WanConditioner", "init_args": {
                "model_dir": str(wan_dir), "text_dtype": "fp32", "vae_config": {**VAE_CFG, "dim_mult": [1, 2, 4, 4],
                "temporal_downsample": [False, True, True]}}},
            "video_shape": [16, 2, 2, 2], "dfake_gen_update_ratio": 2}},
        "data": {"class_path": "sfplus.datamodules.PromptDataModule",
                 "init_args": {"path": str(prompts), "batch_size": 2}},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(config)])
    main(["predict", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 2
    with pytest.raises(SystemExit) as exit_:  # a missing file stops the run before anything loads, and is named
        main(["fit", "--config", str(config), "--model.init_args.conditioner.init_args.vae", str(tmp_path / "no.pth"),
              "--overwrite_checkpoints", "true"])  # a second fit into the run's folder must say it starts over
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "sfplus: error:" in err and f"WanConditioner: vae {tmp_path / 'no.pth'} does not exist" in err


def test_i2v_distillation_and_prediction_through_the_recipes(wan_dir, tmp_path):
    import lightning as L
    from PIL import Image

    from sfplus.datamodules.images import ImagePromptDataModule
    from sfplus.modules import DistillModule

    def image_folder(name, h, w, n):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(n):
            rgb = (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
            Image.fromarray(rgb).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"a cat number {i}")
        return str(folder)

    # Tiny I2V DiT sized to the tiny folder's encoders (T5 width 32 x 512 tokens, CLIP width 32, 16-channel VAE).
    net = {"text_dim": 32, "text_len": 512, "image_dim": 32}
    module = DistillModule(net="tiny-i2v", net_overrides=net,
                           conditioner=conditioner(wan_dir, i2v=True, num_pixel_frames=5), dfake_gen_update_ratio=2,
                           video_shape=[16, 2, 2, 2], seed=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=ImagePromptDataModule(image_folder("train", 16, 16, 2), batch_size=2, size=[16, 16]))
    assert (module.generator_steps, module.critic_steps) == (1, 2)  # G, C, C
    # Predict: the video takes each image's Wan size (16x32 here), not video_shape.
    out = trainer.predict(module, datamodule=ImagePromptDataModule(image_folder("predict", 16, 32, 1),
                                                                    max_area=16 * 32))
    assert out[0]["latents"].shape == (1, 16, 2, 2, 4) and out[0]["videos"].shape == (1, 5, 16, 32, 3)


@pytest.mark.gpu
def test_encoders_load_onto_the_module_device_and_offload_stays_on_the_cpu(wan_dir):
    """On CUDA: lazily loaded encoders land where .to() moved the conditioner (VAE in bf16, CLIP under fp16
    autocast); an offloaded T5 stays on the CPU and only its embeddings reach the GPU."""
    cuda = torch.device("cuda")
    cond = conditioner(wan_dir, i2v=True, num_pixel_frames=5).to(cuda)
    ctx = cond.text(["a cat sits on a mat"])["context"]
    assert ctx.device.type == "cuda" and cond.text_encoder.device.type == "cuda"
    out = cond.image_condition(images(2))  # CPU images are moved
    assert out["y"].device.type == out["clip_fea"].device.type == "cuda"
    assert next(cond.codec.parameters()).dtype == torch.bfloat16
    ref = conditioner(wan_dir, i2v=True, num_pixel_frames=5, vae_dtype="fp32").image_condition(images(2))
    torch.testing.assert_close(out["y"].cpu(), ref["y"], rtol=0.05, atol=0.05)  # bf16 VAE ≈ fp32 VAE
    torch.testing.assert_close(out["clip_fea"].cpu(), ref["clip_fea"], rtol=0.02, atol=0.02)  # fp16 autocast
    assert cond.decode(torch.zeros(1, 16, 2, 2, 2)).device.type == "cuda"

    off = conditioner(wan_dir, offload_text_encoder=True).to(cuda)
    ctx_off = off.text(["a cat sits on a mat"])["context"]
    assert ctx_off.device.type == "cuda" and off._offloaded_text_encoder.device.type == "cpu"
    torch.testing.assert_close(ctx_off, ctx, rtol=1e-4, atol=1e-4)
    assert off.negative(2)["context"].device.type == "cuda"
