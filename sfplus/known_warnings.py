"""Library messages that say nothing about an sfplus run, silenced one exact message at a time.

Each filter names one message (and, where it can, the module that emits it), says why it is benign for sfplus, and
leaves every other warning alone: ``warnings`` filters match the start of a message with a regular expression, and
the logging filter drops one exact line. Installed by the ``sfplus`` command (:mod:`sfplus.cli`); a library user who
imports sfplus keeps every message.
"""

from __future__ import annotations

import logging
import re
import warnings

from torch import nn

# Lightning logs these advertisements (INFO) when the run has no LitLogger ("For seamless cloud logging and
# experiment tracking, try installing litlogger") or no LitModelCheckpoint ("For seamless cloud uploads and
# versioning, try installing litmodels"); sfplus logs to TensorBoard and checkpoints with AtomicCheckpoint.
LIGHTNING_TIPS = "💡 Tip: For seamless cloud "

# torch >= 2.10 deprecates `isinstance(x, LeafSpec)`; lightning 2.6's own pytree helper still uses it. Nothing for
# sfplus to change; it goes away with a Lightning release that follows torch.
PYTREE_LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated"

# The prediction batch sampler (datamodules/samplers.py) pads the last batches with -1 instead of dropping rows,
# so Lightning's `drop_last=False` injection, which it cannot do for a custom batch sampler, is not needed.
CUSTOM_PREDICT_SAMPLER = "You are using a custom batch sampler `EvenSplitSampler` for prediction"

# Lightning notes on every save that it writes the whole resumable state (optimizers, loops, callbacks) by
# default: what AtomicCheckpoint wants. (Checkpoints are always loaded with torch.load(weights_only=True).)
SAVE_DEFAULT_NOTE = "`weights_only` was not set, defaulting to `False`."

# Lightning warns about every module in eval mode when fit starts; see :func:`excuse_frozen_eval_modules`.
EVAL_MODE_AT_FIT_START = r"Found \d+ module\(s\) in eval mode at the start of training"


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_known_warnings() -> None:
    """Install the filters for the benign library messages listed above (idempotent)."""
    warnings.filterwarnings("ignore", message=re.escape(PYTREE_LEAFSPEC), category=FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=re.escape(CUSTOM_PREDICT_SAMPLER))
    for name, start in (("lightning.pytorch.utilities.rank_zero", LIGHTNING_TIPS),  # rank_zero_info's logger
                        ("lightning.pytorch.trainer.connectors.checkpoint_connector", SAVE_DEFAULT_NOTE)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))


def unexpected_eval_modules(module: nn.Module) -> list[str]:
    """Names of the modules in eval mode that are not part of a frozen net.

    A frozen net (the teacher, the EMA copy, the text encoder and codec) is put in eval mode on purpose. A module in
    eval mode is excused when it has no trainable parameter and either holds parameters or buffers of its own (a
    frozen net) or sits in a module without trainable parameters (a stateless part of a frozen net, as the toy
    codec in the conditioner). A stateless module in eval mode inside a trainable net (a dropout left in eval,
    say) is not excused, nor is any module with a trainable parameter.
    """
    modules = dict(module.named_modules())

    def trainable(m: nn.Module) -> bool:
        return any(p.requires_grad for p in m.parameters())

    def has_state(m: nn.Module) -> bool:
        return any(True for _ in m.parameters()) or any(True for _ in m.buffers())

    unexpected = []
    for name, m in modules.items():
        if m.training:
            continue
        parent = modules[name.rpartition(".")[0]] if name else None
        if trainable(m) or not (has_state(m) or (parent is not None and not trainable(parent))):
            unexpected.append(name)
    return unexpected


def excuse_frozen_eval_modules(module: nn.Module) -> None:
    """Silence Lightning's "Found N module(s) in eval mode" for this run when every such module belongs to a frozen
    net (:func:`unexpected_eval_modules` is empty); otherwise Lightning's warning shows as usual, also when an
    earlier fit in the same process was excused (the newest filter comes first)."""
    action = "default" if unexpected_eval_modules(module) else "ignore"
    warnings.filterwarnings(action, message=EVAL_MODE_AT_FIT_START)
