"""`sfplus toy-eval` on small checkpoints: the four rows, the JSON next to the outputs, the table."""

from __future__ import annotations

import json

import lightning as L
import pytest

from sfplus.callbacks import EMA
from sfplus.cli import main
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import PromptDataModule, ToyDataModule
from sfplus.modules import DiffusionModule, DistillModule

SMALL = {"num_layers": 1, "dim": 32, "ffn_dim": 64}


def _fit(module, data, root, steps):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=str(root), callbacks=[EMA(decay=0.5)])
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.mark.parametrize("pack", [1, 4])
def test_toy_eval_scores_teacher_and_student(tmp_path, capsys, pack):
    """Also with the demo's packed codec (4 frames per latent frame): toy-eval finds the codec from the teacher's
    latent shape and scores decoded videos."""
    layout = {} if pack == 1 else dict(net_overrides={**SMALL, "in_dim": 12, "out_dim": 12},
                                       conditioner=ToyConditioner(frames_per_latent=4), video_shape=[12, 1, 16, 16])
    teacher = DiffusionModule(net="toy", **{"net_overrides": SMALL, **layout}, sample_steps=3)
    t = _fit(teacher, ToyDataModule(batch_size=2, length=8, frames_per_latent=pack), tmp_path / "t", 2)
    t.save_checkpoint(tmp_path / "teacher.ckpt")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    student = DistillModule(net="toy", **{"net_overrides": SMALL, **layout},
                            teacher_checkpoint=str(tmp_path / "teacher.ckpt"), dfake_gen_update_ratio=1)
    s = _fit(student, PromptDataModule(str(prompts), batch_size=2), tmp_path / "s", 2)
    s.save_checkpoint(tmp_path / "student.ckpt")
    main(["toy-eval", "--teacher", str(tmp_path / "teacher.ckpt"), "--student", str(tmp_path / "student.ckpt"),
          "--out", str(tmp_path / "eval"), "--samples_per_prompt", "1"])
    result = json.loads((tmp_path / "eval" / "toy_metrics.json").read_text())
    assert list(result["rows"]) == ["teacher 3 steps + CFG", "teacher 4 steps + CFG", "student 4 steps",
                                    "student EMA 4 steps"]
    assert result["videos_per_row"] == 16
    for row in result["rows"].values():
        assert 0.0 <= row["prompt_accuracy"] <= 1.0 and row["frechet_distance"] >= 0.0
    assert "| student EMA 4 steps |" in capsys.readouterr().out


def test_toy_eval_names_a_missing_checkpoint(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["toy-eval", "--teacher", str(tmp_path / "nope.ckpt")])
    assert "nope.ckpt does not exist" in capsys.readouterr().err


def test_toy_datamodule_packs_clips_for_the_packed_codec():
    plain = next(iter(ToyDataModule(batch_size=2, length=8).train_dataloader()))
    packed = next(iter(ToyDataModule(batch_size=2, length=8, frames_per_latent=4).train_dataloader()))
    assert plain["latents"].shape == (2, 3, 4, 16, 16) and packed["latents"].shape == (2, 12, 1, 16, 16)
    assert packed["prompts"] == plain["prompts"]
    import torch

    assert torch.equal(ToyConditioner(frames_per_latent=4).decode(packed["latents"]), plain["latents"])
    with pytest.raises(ValueError, match="multiple of 3 frames, got 4"):
        ToyDataModule(frames_per_latent=3)
