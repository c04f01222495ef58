"""The ``sfplus`` command line: fit/predict through LightningCLI configs, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sfplus.cli import main


def tiny_config(tmp_path: Path, module: str = "sfplus.modules.DiffusionModule", **model_args) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
                {"class_path": "sfplus.callbacks.VideoWriter",
                 "init_args": {"output_dir": str(tmp_path / "videos"), "upscale": 2}},
            ],
        },
        "model": {
            "class_path": module,
            "init_args": {
                "net": "tiny", "net_overrides": {"in_dim": 3, "out_dim": 3},
                "conditioner": {"class_path": "sfplus.conditioning.ToyConditioner",
                                "init_args": {"text_dim": 16, "text_len": 8}},
                "video_shape": [3, 2, 8, 8], **model_args,
            },
        },
        "data": {"class_path": "sfplus.datamodules.ToyDataModule",
                 "init_args": {"frames": 2, "height": 8, "width": 8, "size": 3, "batch_size": 4, "length": 32,
                               "colours": ["red", "blue"], "directions": ["left", "up"]}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_then_predict_writes_videos_and_sidecars(tmp_path, capsys):
    cfg = tiny_config(tmp_path, sample_steps=2)
    main(["fit", "--config", str(cfg)])
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    sidecars = sorted((tmp_path / "videos").glob("*.json"))
    assert len(videos) == len(sidecars) == 4  # 2 colours x 2 directions x 1 sample
    meta = json.loads(sidecars[0].read_text())
    assert meta["prompt"].startswith("a ") and meta["sampler"]["steps"] == 2 and meta["checkpoint"] == str(ckpt)
    # A second run skips what exists: files are not rewritten.
    mtimes = [v.stat().st_mtime_ns for v in videos]
    main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    assert [v.stat().st_mtime_ns for v in sorted((tmp_path / "videos").glob("*.mp4"))] == mtimes


def test_print_config_lists_recipe_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "cond_dropout" in out and "sample_shift" in out


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    err = _error(["fit", "--config", str(tiny_config(tmp_path)), "--model.init_args.learning_rate_typo", "1"], capsys)
    assert "learning_rate_typo" in err


def test_missing_prompt_source_is_named(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "sfplus.modules.DistillModule")
    missing = tmp_path / "no-such-prompts.txt"
    err = _error(["fit", "--config", str(cfg), "--data", "sfplus.datamodules.PromptDataModule",
                  "--data.path", str(missing)], capsys)
    assert f"sfplus: error: prompt source {missing} does not exist" in err


def test_empty_prompt_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cfg = tiny_config(tmp_path, "sfplus.modules.DistillModule")
    err = _error(["predict", "--config", str(cfg), "--data", "sfplus.datamodules.PromptDataModule",
                  "--data.path", str(empty)], capsys)
    assert "holds no prompts" in err and str(empty) in err


def test_checkpoint_that_does_not_match_is_named(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    main(["fit", "--config", str(cfg)])
    err = _error(["predict", "--config", str(cfg), "--model.init_args.net_overrides",
                  '{"in_dim": 3, "out_dim": 3, "num_layers": 3}', "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")],
                 capsys)
    assert "does not match" in err and "blocks.2" in err
