"""ODEInitModule on tiny nets and ODE shards written with write_shards: the loss falls on a fixed batch, a
checkpointed run resumes to the weights of an uninterrupted one, the EMA is what "ema" readers get, predict is the
causal few-step sampler at the trajectory's steps, and a schedule mismatch is named."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sfplus.callbacks import EMA
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import LatentShardDataModule
from sfplus.datamodules.shard_format import Sample, write_shards
from sfplus.flow import warp_timesteps
from sfplus.modules.ode import ODEInitModule, ODETimestepsError
from sfplus.weights.checkpoints import read_dit_state_dict

TINY = {"in_dim": 3, "out_dim": 3}
SHAPE = (3, 4, 4, 4)  # C, F, H, W
REFERENCE_STEPS = warp_timesteps([1000, 750, 500, 250], 8.0)  # [1000, 960, 888.9, 727.3]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_ode_shards(out: Path, n: int, steps: list[float] = REFERENCE_STEPS) -> Path:
    """Straight-line flow trajectories (what a perfect teacher of one clean video gives), noisiest first."""
    timesteps = torch.tensor([*steps, 0.0])
    samples = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        x0, eps = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
        sigma = (timesteps / 1000).view(-1, 1, 1, 1, 1)
        samples.append(Sample(key=f"s{i}", prompt=f"a red square moving {['left', 'up'][i % 2]}",
                              ode=(1 - sigma) * x0 + sigma * eps, ode_timesteps=timesteps))
    write_shards(samples, out, [n], dtype=torch.float32)
    return out


def module(**kw) -> ODEInitModule:
    kw = {"net": "tiny", "net_overrides": TINY, "conditioner": ToyConditioner(text_dim=16, text_len=8),
          "causal": {"frames_per_block": 2}, "video_shape": list(SHAPE), "optimizer": {"lr": 1e-3}, "seed": 3, **kw}
    return ODEInitModule(**kw)


class Losses(L.Callback):
    def __init__(self):
        self.values: list[float] = []
        self.devices: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        self.devices.append(next(pl_module.model.parameters()).device.type)


def fit(m: ODEInitModule, shards: Path, steps: int, root: Path, ckpt_path: str | None = None, callbacks=()):
    dm = LatentShardDataModule(str(shards), batch_size=2, fields=["ode_latents"], num_workers=0, pin_memory=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=str(root), callbacks=list(callbacks))
    trainer.fit(m, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_loss_falls_on_a_fixed_batch(tmp_path):
    shards = write_ode_shards(tmp_path / "ode", 2)  # batch 2 of 2 samples: every step sees the same batch
    losses = Losses()
    fit(module(optimizer={"lr": 1e-2}), shards, 20, tmp_path, callbacks=[losses])
    assert len(losses.values) == 20 and all(torch.isfinite(torch.tensor(losses.values)))
    first, last = sum(losses.values[:5]) / 5, sum(losses.values[-5:]) / 5
    assert last < 0.4 * first, losses.values  # measured: 1.03 -> 0.16


def test_resume_matches_an_uninterrupted_run(tmp_path):
    shards = write_ode_shards(tmp_path / "ode", 6)  # 3 batches per epoch: the resume lands mid-epoch
    whole = module()
    fit(whole, shards, 5, tmp_path / "a", callbacks=[EMA(decay=0.5, start_iteration=3)])

    first = module()
    trainer = fit(first, shards, 2, tmp_path / "b", callbacks=[EMA(decay=0.5, start_iteration=3)])
    ckpt = tmp_path / "b" / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    assert not first.ema_started
    # Before the EMA starts, "ema" readers (export, the next recipe's generator_checkpoint) get the live net.
    sd = read_dit_state_dict(ckpt, which="ema")
    for k, v in first.model.state_dict().items():
        assert torch.equal(sd[k], v), k

    resumed = module()
    fit(resumed, shards, 5, tmp_path / "b", ckpt_path=str(ckpt), callbacks=[EMA(decay=0.5, start_iteration=3)])
    assert (resumed.iteration, resumed.batches_seen, bool(resumed.ema_started)) == (5, 5, True)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(whole.model.head.head.weight, whole.model_ema.head.head.weight)  # the EMA lags


def test_predict_is_the_causal_sampler_at_the_trajectory_steps(tmp_path):
    from sfplus.noise import SampleNoise
    from sfplus.sampling.streaming import causal_sample

    m = module()
    m.configure_model()
    assert m.timesteps == pytest.approx(REFERENCE_STEPS)
    assert m.snapshot_timesteps(torch.tensor([[*REFERENCE_STEPS, 0.0]] * 2)) == pytest.approx([*REFERENCE_STEPS, 0])
    cond = m.conditioner.text(["a red square moving left"])
    noise = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    a = m.sample(cond, m.conditioner.negative(1), noise, SampleNoise([7]))
    b = causal_sample(m.model, noise, REFERENCE_STEPS, cond, frames_per_block=2, generator=SampleNoise([7]))
    torch.testing.assert_close(a, b)
    assert m.sampler_description()["kind"] == "causal-few-step" and m.sampler_description()["weights"] == "model"


def test_schedule_mismatch_and_missing_data_are_named(tmp_path):
    shift5 = write_ode_shards(tmp_path / "shift5", 2, steps=warp_timesteps([1000, 750, 500, 250], 5.0))
    with pytest.raises(ODETimestepsError, match=r"\[1000.0, 937.5, 833.33, 625.0, 0.0\] differ .*schedule.shift 8"):
        fit(module(), shift5, 1, tmp_path)
    m = module()
    m.configure_model()
    with pytest.raises(KeyError, match="no \\['ode_latents', 'ode_timesteps'\\]"):
        m.training_step({"prompts": ["x"], "latents": torch.zeros(1, *SHAPE)}, 0)
    with pytest.raises(ValueError, match="frames_per_block must be >= 1"):
        module(causal={"frames_per_block": 0})


@pytest.mark.gpu
def test_ode_init_trains_and_samples_on_cuda(tmp_path):
    """Block-causal training through flex attention on CUDA, then the KV-cache sampler."""
    shards = write_ode_shards(tmp_path / "ode", 2)
    m = module(optimizer={"lr": 1e-2})
    losses = Losses()
    dm = LatentShardDataModule(str(shards), batch_size=2, fields=["ode_latents"], num_workers=0, pin_memory=False)
    L.Trainer(accelerator="cuda", devices=1, max_steps=10, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
              default_root_dir=str(tmp_path), callbacks=[losses]).fit(m, datamodule=dm)
    assert losses.devices == ["cuda"] * 10  # Lightning moves the module back to the CPU after fit
    assert all(torch.isfinite(torch.tensor(losses.values))) and losses.values[-1] < losses.values[0]
    from sfplus.noise import SampleNoise

    m.to("cuda")
    cond = m.conditioner.text(["a red square moving left"], m.device)
    video = m.sample(cond, m.conditioner.negative(1, m.device), torch.randn(1, *SHAPE, device=m.device),
                     SampleNoise([1], m.device))
    assert video.shape == (1, *SHAPE) and torch.isfinite(video).all()
