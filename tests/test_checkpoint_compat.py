"""Checkpoints written by an earlier sfplus still load: a frozen Lightning checkpoint of a tiny causal DMD + GAN run
(generator, critic, EMA, discriminator head, both AdamW states, counters), saved by session 6's code, resumes in
today's DistillModule and its EMA generator reads back for export.

Made with (session 6, lightning 2.6.6, torch 2.13): tiny preset with ``TINY`` overrides, ``ToyConditioner(16, 8)``,
teacher ``write_tiny_teacher``, ``generator_type="causal"``, ``frames_per_block=1``
(today: ``causal={"frames_per_block": 1}``), ``video_shape=[3, 2, 4, 4]``,
``dfake_gen_update_ratio=2``, ``gan={"blocks": [0, 1]}``, ``seed=1``, EMA(decay=0.5), 3 updates on 4 random latent
samples, ``trainer.save_checkpoint(path)`` (the whole resumable state). A change that renames a state-dict key, drops a
counter or reshapes a net fails here: keep old checkpoints loading (or convert them) rather than regenerating this.

Its discriminator head predates the reference's head layout (the GAN defaults since): it resumes with the three head
options that rebuild it (``OLD_HEAD``), and without them loading names those options.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sfplus.callbacks import EMA
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import LatentShardDataModule
from sfplus.datamodules.shard_format import Sample, write_shards
from sfplus.modules import DistillModule
from sfplus.weights.checkpoints import CheckpointError, read_dit_state_dict
from tests.helpers import TINY, write_tiny_teacher

OLD = Path(__file__).parent / "data" / "distill_causal_gan_session6.ckpt"
#: sfplus's discriminator head before the reference's layout (4 x width FFN, no register-norm weight, affine norm2).
OLD_HEAD = {"ffn_dim": None, "register_norm_weight": False, "norm2_affine": True}


def _module(tmp_path, gan):
    return DistillModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                         teacher_checkpoint=write_tiny_teacher(tmp_path / "teacher.safetensors"),
                         causal={"frames_per_block": 1}, video_shape=[3, 2, 4, 4],
                         dfake_gen_update_ratio=2, gan=gan, seed=1)


def _fit(module, tmp_path):
    g = torch.Generator().manual_seed(0)
    samples = [Sample(key=f"s{i}", prompt=f"a red square moving {i}", latent=torch.randn([3, 2, 4, 4], generator=g))
               for i in range(4)]
    write_shards(samples, tmp_path / "shards", [2, 2], dtype=torch.float32)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[EMA(decay=0.5)], default_root_dir=str(tmp_path))
    data = LatentShardDataModule(str(tmp_path / "shards"), batch_size=2, fields=["latents"], num_workers=0)
    trainer.fit(module, datamodule=data, ckpt_path=str(OLD))


def test_a_session6_checkpoint_resumes_and_exports(tmp_path):
    saved = torch.load(OLD, map_location="cpu", weights_only=True)
    assert saved["sfplus"]["counters"] == {"iteration": 2, "batches_seen": 3, "generator_steps": 1,
                                           "critic_steps": 2, "ema_started": 1}
    module = _module(tmp_path, {"blocks": [0, 1], **OLD_HEAD})
    _fit(module, tmp_path)
    # The run continued from the saved counters (G C C | G C), the saved weights were its start.
    assert (module.generator_steps, module.critic_steps, module.batches_seen) == (2, 3, 5)
    ema = read_dit_state_dict(OLD, which="ema")
    assert ema.keys() == module.generator_ema.state_dict().keys()
    assert all(ema[k].shape == v.shape for k, v in module.generator_ema.state_dict().items())


def test_a_session6_gan_head_under_todays_defaults_names_the_options(tmp_path):
    with pytest.raises(CheckpointError, match=r"ffn_dim: 128, register_norm_weight: false, norm2_affine: true"):
        _fit(_module(tmp_path, {"blocks": [0, 1]}), tmp_path)
