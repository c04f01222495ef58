"""``sfplus`` command line: LightningCLI for ``fit | validate | predict`` plus tool subcommands.

    sfplus fit --config configs/toy/teacher.yaml
    sfplus predict --config configs/toy/dmd.yaml --ckpt_path runs/toy-dmd/checkpoints/last.ckpt
    sfplus toy-eval --teacher ... --student ...

Errors that come from the user's input (files, keys, values) are printed as one ``sfplus: error: ...`` message;
set ``SFPLUS_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry

# Imported so that class names (not only class paths) work in configs.
import sfplus.callbacks  # noqa: F401
import sfplus.conditioning  # noqa: F401
import sfplus.datamodules  # noqa: F401
from sfplus.known_warnings import silence_known_warnings
from sfplus.modules import DiffusionModule, DistillModule  # noqa: F401
from sfplus.parallel import close_process_group

# The `sfplus` command silences a few benign library messages, each by its exact text (see sfplus/known_warnings.py).
silence_known_warnings()


# Configs may interpolate, e.g. `critic_betas: ${model.init_args.betas}`. In "omegaconf+" mode OmegaConf resolves
# `${...}` once every config file and command-line value is merged, so overriding the source on the command line
# also changes what refers to it. LightningCLI gives each subcommand its own parser, which reads --config. A whole
# value may be interpolated, not an element of a list (elements are type-checked before resolving).
PARSER_MODE = {"parser_mode": "omegaconf+"}
PARSER_KWARGS = {**PARSER_MODE, **{name: dict(PARSER_MODE) for name in LightningCLI.subcommands()}}


def read_config(path: str | os.PathLike) -> dict:
    """A recipe YAML as a plain dict with its ``${...}`` interpolations resolved, the values the CLI sees (tools that
    rewrite a shipped config start from this)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


class SfplusCLI(LightningCLI):
    """LightningCLI with sfplus's defaults: manual optimization, own samplers, resumable logs."""

    def __init__(self, args=None) -> None:
        import lightning as L

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

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        refuse_fsdp_strategy(config.get("trainer", {}).get("strategy"))


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
    from sfplus import export, plan, toy_eval

    return {"toy-eval": toy_eval.main, "export": export.main, "plan": plan.main}


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        tools = _tool_commands()
        if argv and argv[0] in tools:
            tools[argv[0]](argv[1:])
        else:
            SfplusCLI(args=args)
            close_process_group()
    except (ValueError, FileNotFoundError, PermissionError, KeyError) as err:
        if os.environ.get("SFPLUS_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sfplus: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
