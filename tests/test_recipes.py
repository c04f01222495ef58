"""Every distillation recipe runs end to end through DistillModule on tiny nets, with the right update schedule,
and gets finite losses: DMD/SiD on bidirectional and causal generators, CausVid (with teacher forcing), and the
GAN term; plus predict for the causal generator."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sfplus.callbacks import EMA
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import PromptDataModule, ToyDataModule
from sfplus.modules import DistillModule
from tests.helpers import TINY, write_tiny_teacher


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> str:
    return write_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


class LossRecorder(L.Callback):
    def __init__(self):
        self.metrics: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(tmp_path: Path, teacher: str, steps: int = 5, data: str = "toy", **kw) -> tuple[DistillModule, LossRecorder]:
    module = DistillModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                           teacher_checkpoint=teacher, dfake_gen_update_ratio=2,
                           generator_optimizer={"lr": 1e-3}, critic_optimizer={"lr": 1e-3},
                           video_shape=[3, 4, 4, 4], seed=1, **kw)
    if data == "toy":
        dm = ToyDataModule(frames=4, height=4, width=4, size=1, speed=1, batch_size=2, length=16)
    else:
        prompts = tmp_path / "p.txt"
        prompts.write_text("a red square moving left\na blue square moving up\n")
        dm = PromptDataModule(str(prompts), batch_size=2)
    rec = LossRecorder()
    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
              callbacks=[EMA(decay=0.5), rec]).fit(module, datamodule=dm)
    return module, rec


def _finite(rec: LossRecorder, *keys: str) -> None:
    for key in keys:
        values = [m[key] for m in rec.metrics if key in m]
        assert values, f"{key} was never logged"
        assert all(torch.isfinite(torch.tensor(values))), (key, values)


@pytest.mark.parametrize("generator_type", ["bidirectional", "causal"])
@pytest.mark.parametrize("loss", ["dmd", "sid"])
def test_data_free_recipes(tmp_path, teacher_file, generator_type, loss):
    module, rec = fit(tmp_path, teacher_file, data="prompts", distribution_loss=loss,
                      causal={"frames_per_block": 2} if generator_type == "causal" else None)
    assert (module.generator_steps, module.critic_steps) == (2, 3)
    _finite(rec, "train/generator_loss", "train/critic_loss")
    # The generator and critic trained, the teacher did not.
    assert any((p - q).abs().sum() > 0 for p, q in zip(module.generator.parameters(), module.teacher.parameters()))


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_causvid(tmp_path, teacher_file, teacher_forcing):
    module, rec = fit(tmp_path, teacher_file, distribution_loss="causvid", teacher_forcing=teacher_forcing,
                      causal={"frames_per_block": 2})
    _finite(rec, "train/generator_loss", "train/critic_loss")


def test_causvid_without_latents_is_a_clear_error(tmp_path, teacher_file):
    with pytest.raises(KeyError, match="needs clean latents"):
        fit(tmp_path, teacher_file, data="prompts", distribution_loss="causvid")


@pytest.mark.parametrize("relativistic", [False, True])
def test_gan_term_trains_the_head(tmp_path, teacher_file, relativistic):
    module, rec = fit(tmp_path, teacher_file, gan={"blocks": [0, -1], "r1_weight": 1.0, "r2_weight": 1.0,
                                                    "head_lr_multiplier": 10.0, "relativistic": relativistic})
    _finite(rec, "train/generator_loss", "train/critic_loss")
    assert any(k.startswith("train/disc_") for m in rec.metrics for k in m)
    assert any("train/gan_d_real" in m for m in rec.metrics) == relativistic
    fresh = type(module.disc_head)(module.disc_head.dim, 2, 2)
    assert module.gan.blocks == [0, 1]
    assert module.disc_head.register_tokens.shape == fresh.register_tokens.shape
    # the GAN defaults build the reference's head
    assert module.disc_head.layout() == {"ffn_dim": 8192, "register_norm_weight": True, "norm2_affine": False}


def test_gan_head_options_reach_the_head():
    module = DistillModule(net="tiny", gan={"ffn_dim": None, "register_norm_weight": False, "norm2_affine": True})
    module.configure_model()
    assert module.disc_head.layout() == {"ffn_dim": 128, "register_norm_weight": False, "norm2_affine": True}
    with pytest.raises(ValueError, match="ffn_dim"):
        DistillModule(net="tiny", gan={"ffn_dim": 0})


def test_unknown_gan_option_is_named(teacher_file):
    with pytest.raises(ValueError, match="r3_weight"):
        DistillModule(net="tiny", gan={"r3_weight": 1.0})


def test_causal_predict_matches_streaming_sampler(tmp_path, teacher_file):
    module, _ = fit(tmp_path, teacher_file, steps=2, data="prompts", causal={"frames_per_block": 2})
    from sfplus.noise import SampleNoise
    from sfplus.sampling.streaming import causal_sample

    cond = module.conditioner.text(["a red square moving left"])
    noise = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    a = module.sample(cond, module.conditioner.negative(1), noise, SampleNoise([7]))
    b = causal_sample(module.sampling_net(), noise, module.timesteps, cond, frames_per_block=2,
                      generator=SampleNoise([7]))
    torch.testing.assert_close(a, b)


def test_long_causal_rollouts_score_the_last_window(tmp_path, teacher_file):
    """Rollouts longer than the training length: the critic and teacher see the last window with a re-encoded
    first frame, and the generator loss skips that window's first block."""
    module, rec = fit(tmp_path, teacher_file, data="prompts", causal={"frames_per_block": 2},
                      max_rollout_frames=8)
    _finite(rec, "train/generator_loss", "train/critic_loss")
    video = torch.randn(2, 3, 8, 4, 4)
    window, mask = module._last_window(video, 4)
    assert window.shape == (2, 3, 4, 4, 4) and mask.shape == window.shape
    torch.testing.assert_close(window[:, :, 1:], video[:, :, -3:])
    # identity codec: the re-encoded frame is the (clamped) last frame before the window
    torch.testing.assert_close(window[:, :, :1], video[:, :, 4:5].clamp(-1, 1))
    assert not mask[:, :, :2].any() and mask[:, :, 2:].all()
    lengths = {module.rollout.length(module, f"x{i}", 4) for i in range(8)}  # alike on all ranks, whole blocks
    assert lengths <= {4, 6, 8}


def test_gan_warmup_trains_only_the_head_first(tmp_path, teacher_file):
    module, _ = fit(tmp_path, teacher_file, steps=3, gan={"warmup_steps": 3})
    assert module.generator_steps == 0 and module.critic_steps == 3
    assert all(torch.equal(p, q) for p, q in zip(module.critic.parameters(), module.teacher.parameters()))


@pytest.mark.parametrize("teacher_forcing,aug", [(False, 0), (True, 0), (True, 200)])
def test_causal_diffusion_training(tmp_path, teacher_forcing, aug):
    """Causal diffusion / teacher-forcing pre-training (docs/algorithms.md, 'Causal diffusion (teacher forcing)')
    runs, learns, and its block-causal loss does not depend on later frames."""
    from sfplus.modules import DiffusionModule

    module = DiffusionModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                             causal={"frames_per_block": 2}, teacher_forcing=teacher_forcing,
                             noise_augmentation_max_timestep=aug, video_shape=[3, 4, 4, 4], optimizer={"lr": 3e-3})
    rec = LossRecorder()
    L.Trainer(accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
              callbacks=[rec]).fit(module, datamodule=ToyDataModule(frames=4, height=4, width=4, size=1, speed=1,
                                                                     batch_size=4, length=4, seed=0))
    losses = [m["train/loss"] for m in rec.metrics]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]  # a 4-clip set is learnable
    # Causality: the prediction for frames 0-1 ignores frames 2-3.
    x = torch.randn(1, 3, 4, 4, 4)
    y = x.clone()
    y[:, :, 2:] += 1
    t = torch.full((1, 4), 500.0)
    ctx = module.conditioner.text(["a red square moving left"])
    with torch.no_grad():
        a = module.model(x, t, **ctx, causal=module.causal)
        b = module.model(y, t, **ctx, causal=module.causal)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])
    # Sampling runs block by block (docs/algorithms.md, 'Causal diffusion sampler'): the first block ignores the later
    # blocks' noise.
    uncond = module.conditioner.negative(1)
    with torch.no_grad():
        va = module.sample(ctx, uncond, x, torch.Generator())
        vb = module.sample(ctx, uncond, y, torch.Generator())
    assert va.shape == x.shape and module.sampler_description()["kind"] == "causal-euler-cfg"
    torch.testing.assert_close(va[:, :, :2], vb[:, :, :2])
    assert not torch.allclose(va[:, :, 2:], vb[:, :, 2:])
