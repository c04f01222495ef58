"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sfplus.nets.presets import build_dit

#: The tiny preset on 3-channel pixel "latents" (the toy codec).
TINY = {"in_dim": 3, "out_dim": 3}


def write_tiny_teacher(path: Path, overrides: dict | None = None) -> str:
    """Save a seeded tiny teacher (preset fields ``overrides``, default ``TINY``) to ``path`` (safetensors) and
    return the path as a string.

    ``init_weights`` zeroes the head; it gets small random weights so the teacher's output depends on its input.
    """
    torch.manual_seed(0)
    net = build_dit("tiny", **(TINY if overrides is None else overrides))
    net.init_weights()
    torch.nn.init.normal_(net.head.head.weight, std=0.02)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


#: A tiny WanVAE (the real class) for the tiny Wan folder.
TINY_VAE = dict(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, temporal_downsample=(False, True, True))
#: DiT preset fields that match the tiny Wan folder's encoders (T5 width 32 x 512 tokens; CLIP width 32).
TINY_WAN_TEXT = {"text_dim": 32, "text_len": 512}
TINY_WAN_IMAGE = {"image_dim": 32}
_VOCAB = 64
_SENTENCES = ["a red square moves left", "a cat sits on a mat", "two dogs run in the park", "the sun sets slowly"]


def _write_tokenizer(folder: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 8), model_writer=buf, vocab_size=_VOCAB - 4, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))


def write_tiny_wan_folder(root: Path) -> Path:
    """A tiny Wan2.1-I2V-like folder with the published file names and Wan key layouts: UMT5 encoder, tokenizer,
    VAE and CLIP of the real classes (transformers' UMT5 / CLIP converted with sfplus's key maps). Returns ``root``.
    """
    import transformers

    from sfplus.conditioning.wan import CLIP_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE
    from sfplus.nets.image import hf_clip_to_wan
    from sfplus.nets.text import hf_t5_to_wan
    from sfplus.nets.vae import WanVAE

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    ))  # fmt: skip
    torch.save({k: v.clone() for k, v in hf_t5_to_wan(t5.state_dict()).items()}, root / T5_FILE)
    _write_tokenizer(root / TOKENIZER_DIR)
    torch.save(WanVAE(**TINY_VAE).state_dict(), root / VAE_FILE)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=16,
    ))  # fmt: skip
    torch.save({k: v.clone() for k, v in hf_clip_to_wan(clip.state_dict()).items()}, root / CLIP_FILE)
    return root


def write_run_config(root: Path, module: str = "sfplus.modules.DiffusionModule", every_n_iterations: int | None = 1,
                     name: str = "config.yaml", **model_args) -> Path:
    """A tiny toy run as a user writes it for ``sfplus fit``: an ``AtomicCheckpoint`` into ``<root>/run/checkpoints``
    and no ``Preemption`` callback (the CLI adds one). Returns the YAML path; a few seconds per 2 steps on a CPU."""
    import yaml

    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root / "run"),
            "callbacks": [{"class_path": "sfplus.callbacks.AtomicCheckpoint",
                           "init_args": {"every_n_iterations": every_n_iterations, "keep_last": 3}}],
        },
        "model": {"class_path": module, "init_args": {
            "net": "tiny", "net_overrides": dict(TINY),
            "conditioner": {"class_path": "sfplus.conditioning.ToyConditioner",
                            "init_args": {"text_dim": 16, "text_len": 8}},
            "video_shape": [3, 2, 8, 8], **model_args}},
        "data": {"class_path": "sfplus.datamodules.ToyDataModule",
                 "init_args": {"frames": 2, "height": 8, "width": 8, "size": 3, "batch_size": 2, "length": 10_000,
                               "colours": ["red", "blue"], "directions": ["left", "up"]}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_error_line(args: list[str], capsys) -> str:
    """The last stderr line of an ``sfplus`` command that must fail with exit code 2 and no traceback (the line a
    user reads)."""
    import pytest

    from sfplus.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def write_tiny_causal_run(root: Path, frames: int = 8, size: int = 8, frames_per_block: int = 1) -> tuple[Path, Path]:
    """A config and a checkpoint of a tiny causal DMD generator (random weights) that ``sfplus serve`` and
    ``sfplus predict`` load: ``frames`` latent (= pixel, toy codec) frames of ``size`` x ``size`` pixels in blocks of
    ``frames_per_block``. Returns (config path, checkpoint path)."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    teacher = write_tiny_teacher(root / "teacher.safetensors")
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False},
        "model": {"class_path": "sfplus.modules.DistillModule", "init_args": {
            "net": "tiny", "net_overrides": dict(TINY),
            "conditioner": {"class_path": "sfplus.conditioning.ToyConditioner",
                            "init_args": {"text_dim": 16, "text_len": 8}},
            "teacher_checkpoint": teacher, "causal": {"frames_per_block": frames_per_block},
            "video_shape": [3, frames, size, size], "predict_weights": "generator"}},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    from sfplus.serve.loader import module_from_config

    module = module_from_config(config)
    module.configure_model()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = root / "last.ckpt"
    torch.save(ckpt, path)
    return config, path
