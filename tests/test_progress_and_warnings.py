"""Readable output: ProgressLog's lines, and known-benign library messages silenced one by one (others still show)."""

from __future__ import annotations

import io
import logging
import warnings

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn

from sfplus.callbacks import ProgressLog
from sfplus.known_warnings import (
    CUSTOM_PREDICT_SAMPLER,
    LIGHTNING_TIPS,
    SAVE_DEFAULT_NOTE,
    excuse_frozen_eval_modules,
    silence_known_warnings,
    unexpected_eval_modules,
)
from sfplus.progress import format_duration


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=4)


def test_format_duration():
    assert format_duration(42.4) == "42 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(7440) == "2 h 04 min"


def test_progress_log_prints_updates_rate_eta_and_loss(tmp_path):
    out = io.StringIO()  # not a terminal
    log = ProgressLog(every_s=0, stream=out)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[log], default_root_dir=tmp_path)
    trainer.fit(_Tiny())
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fit: update 1/3 (33%)") and "loss" in lines[0]
    assert "updates/s" in lines[1] and "ETA" in lines[1]
    assert lines[-1].startswith("fit: done, 3 updates in")
    assert not trainer.progress_bar_callback.is_enabled  # the bar is off when the lines are on


def test_progress_log_stays_quiet_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not ProgressLog(stream=Tty()).active
    assert ProgressLog(stream=Tty(), when="always").active
    assert not ProgressLog(stream=io.StringIO(), when="never").active


def test_only_frozen_nets_may_be_in_eval_mode():
    module = nn.Module()
    module.trainable = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    module.frozen = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).requires_grad_(False).eval()
    module.encoder = nn.Module()  # a frozen container: a stateless part beside a frozen net with a buffer
    module.encoder.table = nn.Module()
    module.encoder.table.register_buffer("positions", torch.zeros(2))
    module.encoder.codec = nn.Identity()
    module.encoder.eval()
    assert unexpected_eval_modules(module) == []
    module.trainable[1].eval()  # a dropout of a trained net left in eval mode
    module.trainable[0].eval()  # a trained layer in eval mode
    assert unexpected_eval_modules(module) == ["trainable.0", "trainable.1"]


def test_known_messages_are_silenced_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn(CUSTOM_PREDICT_SAMPLER + " Lightning would normally ...", PossibleUserWarning, stacklevel=1)
        warnings.warn("You are using a custom batch sampler `Other` for prediction.", PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["You are using a custom batch sampler `Other` for prediction."]

    tips = _kept("lightning.pytorch.utilities.rank_zero",
                 LIGHTNING_TIPS + "logging and experiment tracking, try installing litlogger",
                 "GPU available: False, used: False")
    assert tips == ["GPU available: False, used: False"]
    saves = _kept("lightning.pytorch.trainer.connectors.checkpoint_connector", SAVE_DEFAULT_NOTE,
                  "Restoring states from the checkpoint path at last.ckpt")
    assert saves == ["Restoring states from the checkpoint path at last.ckpt"]


def _kept(logger_name: str, *messages: str) -> list[str]:
    """The ``messages`` logged at INFO through ``logger_name`` that reach a handler (the filters let through)."""
    logger = logging.getLogger(logger_name)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        for message in messages:
            logger.info(message)
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_the_eval_mode_warning_is_excused_per_run():
    frozen = nn.Module()
    frozen.trainable = nn.Linear(2, 2)
    frozen.teacher = nn.Linear(2, 2).requires_grad_(False).eval()
    careless = nn.Module()
    careless.trainable = nn.Linear(2, 2).eval()
    message = "Found 1 module(s) in eval mode at the start of training. This may lead to unexpected behavior"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        excuse_frozen_eval_modules(frozen)
        warnings.warn(message, PossibleUserWarning, stacklevel=1)
        assert caught == []
        excuse_frozen_eval_modules(careless)  # a later fit in the same process with a real problem
        warnings.warn(message, PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [message]
