"""``sfplus`` command line: LightningCLI for ``fit | validate | predict`` plus tool subcommands.

    sfplus fit --config configs/toy/teacher.yaml
    sfplus predict --config configs/toy/dmd.yaml --ckpt_path runs/toy-dmd/checkpoints/last.ckpt
    sfplus toy-eval --teacher ... --student ...
    sfplus serve --config configs/toy/dmd.yaml --ckpt_path runs/toy-dmd/checkpoints/last.ckpt

Errors that come from the user's input (files, keys, values, output folders, a full disk) are printed as one
``sfplus: error: ...`` line, the last one printed; set ``SFPLUS_DEBUG=1`` to see the traceback.

Never losing a run (what ``fit`` adds to Lightning's defaults):

* ``--ckpt_path last`` / ``hpc`` resume from sfplus's own checkpoints, an explicit path is checked before anything
  is built, and a fresh ``fit`` into a folder holding checkpoints is refused unless ``--overwrite_checkpoints true``
  (:mod:`sfplus.resume`);
* a :class:`~sfplus.callbacks.Preemption` handler is added when the config lists none (``--preemption false`` turns
  it off): SIGTERM / SIGUSR1 save ``last.ckpt`` at the next step boundary, and the command then exits with
  128 + the signal number (a scheduler sees the job did not finish), after requeueing it under SLURM on SIGUSR1.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import lightning as L
from jsonargparse import ArgumentError, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from omegaconf import OmegaConf

# Imported so that class names (not only class paths) work in configs.
import sfplus.callbacks  # noqa: F401
import sfplus.conditioning.conditioner  # noqa: F401
import sfplus.datamodules  # noqa: F401
from sfplus import plan, serve
from sfplus.callbacks import Preemption
from sfplus.cli_errors import (
    check_config_files,
    check_output_folders,
    one_line,
    os_error_message,
    summarize_parse_error,
)
from sfplus.disk_full import DiskFullError
from sfplus.known_warnings import silence_known_warnings
from sfplus.modules import DiffusionModule, DistillModule  # noqa: F401
from sfplus.parallel import close_process_group
from sfplus.resume import DiscardOldCheckpoints, checkpoint_folders, resolve_ckpt_path
from sfplus.toy import evaluation
from sfplus.weights import export

# The `sfplus` command silences a few benign library messages, each by its exact text (see sfplus/known_warnings.py).
silence_known_warnings()

# Configs may interpolate, e.g. `betas: ${model.init_args.generator_optimizer.betas}`. In "omegaconf+" mode OmegaConf
# resolves `${...}` once every config file and command-line value is merged, so overriding the source on the command
# line also changes what refers to it. LightningCLI gives each subcommand its own parser, which reads --config. A whole
# value may be interpolated, not an element of a list (elements are type-checked before resolving).
PARSER_MODE = {"parser_mode": "omegaconf+"}
PARSER_KWARGS = {**PARSER_MODE, **{name: dict(PARSER_MODE) for name in LightningCLI.subcommands()}}


def read_config(path: str | os.PathLike) -> dict:
    """A recipe YAML as a plain dict with its ``${...}`` interpolations resolved, the values the CLI sees (tools that
    rewrite a shipped config start from this)."""

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


class SfplusCLI(LightningCLI):
    """LightningCLI with sfplus's defaults: manual optimization, own samplers, resumable logs."""

    def __init__(self, args=None) -> None:
        # `${model.init_args.x}` from the config's root, whatever the subcommand (else it must read `${fit.model...}`).
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},  # a requeued job rewrites the same config
            trainer_defaults={"use_distributed_sampler": False, "inference_mode": False},
            args=args,
            auto_configure_optimizers=False,
            parser_kwargs=PARSER_KWARGS,
        )

    # ---- parsing ----------------------------------------------------------------------------------------------
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # Raise instead of printing a 60-line usage: main() prints the line that matters (cli_errors).
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--preemption", type=bool, default=True,
            help="fit: save last.ckpt and stop on SIGTERM / SIGUSR1 (requeue under SLURM) even when the config lists "
                 "no Preemption callback; false turns preemption handling off",
        )
        parser.add_argument(
            "--overwrite_checkpoints", type=bool, default=False,
            help="fit without --ckpt_path: delete the checkpoints an earlier run left in the run's checkpoint "
                 "folder and start over (without it such a fit is refused)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        refuse_fsdp_strategy(config.get("trainer", {}).get("strategy"))
        # Before LightningCLI reads the checkpoint's hyper-parameters and before any model is built.
        sub = self.config.get("subcommand")
        if sub is None:
            return
        config = self.config[sub]
        trainer = config.get("trainer")
        if trainer is not None and sub in ("fit", "validate", "test", "predict"):
            check_output_folders(trainer)
        if "ckpt_path" not in config:
            return
        if config.get("weights_only") is False:
            raise ValueError("--weights_only false would unpickle arbitrary Python objects: sfplus loads "
                             "checkpoints with weights_only=true only")
        config["weights_only"] = True
        self.overwrite_checkpoints = bool(config.get("overwrite_checkpoints"))
        # A one-time instruction, not a property of the run: the saved config.yaml must not carry it into a rerun.
        config["overwrite_checkpoints"] = False
        self.checkpoint_folders = checkpoint_folders(trainer, preemption=bool(config.get("preemption", True)))
        config["ckpt_path"] = resolve_ckpt_path(sub, config.get("ckpt_path"), self.checkpoint_folders,
                                                overwrite=self.overwrite_checkpoints)

    # ---- the trainer ------------------------------------------------------------------------------------------
    def instantiate_trainer(self, **kwargs):
        if self.subcommand == "fit":
            self._configure_preemption()
            if getattr(self, "overwrite_checkpoints", False):
                trainer = self.config_init["fit"]["trainer"]
                trainer["callbacks"].append(DiscardOldCheckpoints(self.checkpoint_folders))
        return super().instantiate_trainer(**kwargs)

    def _configure_preemption(self) -> None:
        config = self.config_init["fit"]
        trainer = config["trainer"]
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        listed = [cb for cb in callbacks if isinstance(cb, Preemption)]
        if not config.get("preemption", True):
            callbacks = [cb for cb in callbacks if not isinstance(cb, Preemption)]
        elif not listed and trainer.get("enable_checkpointing") is not False:
            callbacks.append(Preemption())
        trainer["callbacks"] = callbacks

    def after_fit(self) -> None:
        stopped = [cb for cb in self.trainer.callbacks if isinstance(cb, Preemption) and cb.saved_path is not None]
        self.preempted = (stopped[0].received or signal.SIGTERM, stopped[0].saved_path) if stopped else None


FSDP_REFUSED = (
    "trainer.strategy {name!r} (Lightning's FSDPStrategy) is not supported: it wraps the whole LightningModule, "
    "and with sfplus's alternating generator/critic updates that trains wrong values (README, 'Real models, scale, "
    "data, speed'); use ModelParallelStrategy with data_parallel_size = world size and tensor_parallel_size = 1 "
    "(FSDP2 per block and per net, as tools/slurm/fit.sbatch sets it)"
)


def strategy_class(strategy: Any) -> type | None:
    """The class a ``trainer.strategy`` config value names: a registry alias ("fsdp"), a class name or path (as a
    string or a ``class_path``); None for anything else ("auto", an unknown name: Lightning reports those)."""
    name = strategy.get("class_path") if hasattr(strategy, "get") else strategy
    if not isinstance(name, str):
        return type(strategy) if strategy is not None else None
    if name in StrategyRegistry:
        return StrategyRegistry[name]["strategy"]
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module or "lightning.pytorch.strategies"), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def refuse_fsdp_strategy(strategy: Any) -> None:
    """Refuse Lightning's FSDPStrategy at start-up (before the Trainer exists, so also on a CPU-only machine)."""
    cls = strategy_class(strategy)
    if isinstance(cls, type) and issubclass(cls, FSDPStrategy):
        name = strategy.get("class_path") if hasattr(strategy, "get") else strategy
        raise ValueError(FSDP_REFUSED.format(name=name if isinstance(name, str) else cls.__name__))


def _tool_commands() -> dict[str, Callable]:
    return {"toy-eval": evaluation.main, "export": export.main, "plan": plan.main, "serve": serve.main}


def _fail(message: object, details: str | None = None) -> None:
    if details:
        print(details, file=sys.stderr)
    print(f"sfplus: error: {message}", file=sys.stderr)  # last: the line a user (or a log tail) sees
    sys.exit(2)


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    debug = bool(os.environ.get("SFPLUS_DEBUG"))
    try:
        check_config_files(argv)
        tools = _tool_commands()
        if argv and argv[0] in tools:
            tools[argv[0]](argv[1:], exit_on_error=False)  # parse errors come back here, to be summarised
            return
        cli = SfplusCLI(args=args)
        close_process_group()
    except ArgumentError as err:
        if debug:
            raise
        message = str(err).strip()
        details = "\n".join("  " + ln for ln in message.splitlines()) if "\n" in message else None
        _fail(summarize_parse_error(message), details)
    except (DiskFullError, MisconfigurationException) as err:
        if debug:
            raise
        _fail(err)
    except (ValueError, FileNotFoundError, PermissionError, KeyError) as err:
        if debug:
            raise
        _fail(one_line(err))
    except OSError as err:
        message = os_error_message(err)
        if debug or message is None:
            raise
        _fail(message)
    preempted = getattr(cli, "preempted", None)
    if preempted:
        sig, path = preempted
        print(f"sfplus: stopped by {sig.name}: saved {path}; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + int(sig))


if __name__ == "__main__":
    main()
