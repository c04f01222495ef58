"""LoRA distillation on ONE frozen base (issue #19): teacher, generator and critic share a single copy of the WanDiT
weights; the generator and the critic are the base with their own low-rank adapter on, the teacher is the base with
adapters off.

Adapters are peft's (``peft.inject_adapter_in_model``, the library diffusers uses for Wan LoRAs), named
:data:`ADAPTERS` and injected into the base's block linears (:class:`sfplus.modules.groups.LoRA`'s ``targets``).
Each adapted ``nn.Linear`` ``W`` becomes peft's ``lora.Linear``: ``W x + s · B A x`` with ``A`` [rank, in],
``B`` [out, rank], ``s = alpha / rank``.

* :class:`AdapterSwitch` — which adapter the base runs with right now (one at a time, or none = the teacher). It never
  changes ``requires_grad`` (peft's ``set_adapter`` does; the recipes' optimizer toggling owns those flags), and it
  gives activation checkpointing a recompute context that restores the adapter of the forward being recomputed: a
  backward that recomputes the generator's blocks must not run them with the critic's adapter.
* :class:`LoRANet` — one adapter as a net: calling it selects its adapter and runs the base; its parameters and its
  state dict are its adapter's only (keys ``blocks.{i}.{target}.lora_A.weight`` / ``.lora_B.weight``), so
  optimizers, gradient clipping, EMA and checkpoints see small adapter-only nets.
* :func:`load_base_weights` — Wan-keyed weights into the peft-wrapped base (``q.weight`` → ``q.base_layer.weight``).
* :func:`fresh_adapter` / :func:`set_adapter_state` — seeded initial adapters and (sharded) loading of adapter
  state dicts.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from sfplus.modules.groups import LoRA
from sfplus.noise import stable_seed
from sfplus.parallel import DTYPES, is_sharded
from sfplus.weights.checkpoints import CheckpointError, check_state_dict, read_dit_state_dict
from sfplus.weights.lora_files import lora_to_adapter, read_lora_file
from sfplus.weights.sharded_checkpoint import is_sharded_checkpoint
from sfplus.weights.wan_folders import folder_shapes, iter_folder_shards, locate_weights

__all__ = ["ADAPTERS", "AdapterSwitch", "BaseNet", "LoRANet", "attach_adapters", "fresh_adapter", "load_base_weights",
           "require_peft", "set_adapter_state", "wan_key"]

#: The adapters of a LoRA distillation: the trained generator and critic, and the generator's EMA.
ADAPTERS = ("generator", "critic", "generator_ema")
_WEIGHTS = ("lora_A", "lora_B")


def require_peft():
    """The peft package, or a one-line ImportError naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA distillation needs peft: pip install 'sfplus[lora]'") from None
    return peft


def wan_key(peft_key: str) -> str:
    """Wan key of a base weight: ``...q.base_layer.weight`` → ``...q.weight``."""
    return peft_key.replace(".base_layer.", ".")


def is_adapter_key(key: str) -> bool:
    return any(f".{w}." in key for w in _WEIGHTS) or ".lora_" in key


def _target_regex(targets: list[str]) -> str:
    """peft's ``target_modules`` as a full-name regex: only the block linears named in ``targets``."""
    names = "|".join(t.replace(".", r"\.") for t in sorted(targets))
    return rf"blocks\.\d+\.({names})"


def attach_adapters(base: nn.Module, config: LoRA, adapters: tuple[str, ...] = ADAPTERS) -> AdapterSwitch:
    """Inject one peft LoRA adapter per name into ``base``'s targeted block linears (in place), freeze every base
    weight, and return the switch that selects among them. Works on meta-device nets (sharded builds)."""
    peft = require_peft()
    missing = [t for t in config.targets if not any(n.endswith(f".{t}") for n, _ in base.named_modules())]
    if missing:
        raise ValueError(f"lora.targets {missing} do not exist in this net (I2V-only targets on a T2V net?)")
    lora_config = peft.LoraConfig(r=config.rank, lora_alpha=config.rank if config.alpha is None else config.alpha,
                                  lora_dropout=config.dropout, target_modules=_target_regex(config.targets),
                                  bias="none")
    with warnings.catch_warnings():  # several adapters on one model is the point here, not a mistake
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name in adapters:
            peft.inject_adapter_in_model(lora_config, base, adapter_name=name)
    for p in base.parameters():
        p.requires_grad_(False)  # the adapters' flags are set by their LoRANet (trained) or stay off (EMA)
    return AdapterSwitch(base)


class AdapterSwitch:
    """Selects which adapter ``base`` runs with (None: none, the teacher), without touching ``requires_grad``."""

    def __init__(self, base: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = {name: m for name, m in base.named_modules() if isinstance(m, BaseTunerLayer)}
        if not self.layers:
            raise ValueError("the net has no LoRA layers: attach_adapters first")
        self.active: str | None = "<unset>"  # forces the first select() to set every layer
        self.select(None)

    @torch.compiler.disable
    def select(self, adapter: str | None) -> None:
        """Run the base with ``adapter`` alone (None: adapters off)."""
        if adapter == self.active:
            return
        for layer in self.layers.values():
            flags = [(p, p.requires_grad) for p in layer.parameters()]
            if adapter is None:
                layer.enable_adapters(False)
            else:
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                layer.set_adapter(adapter)
            for p, flag in flags:  # peft flips these; the recipe's optimizer toggling owns them
                p.requires_grad_(flag)
        self.active = adapter

    @contextlib.contextmanager
    def selected(self, adapter: str | None):
        previous = self.active
        self.select(adapter)
        try:
            yield
        finally:
            self.select(previous)

    def checkpoint_contexts(self):
        """``context_fn`` of activation checkpointing: nothing in forward; the forward's adapter in the recompute."""
        return contextlib.nullcontext(), self.selected(self.active)


class LoRANet(nn.Module):
    """One adapter of a shared base as a net (the generator, the critic or the generator's EMA).

    Calling it runs ``base`` with this adapter alone. Its registered submodules are the adapter's ``lora_A`` /
    ``lora_B`` linears, laid out on the base's paths, so ``parameters()`` / ``state_dict()`` hold the adapter only
    (keys ``blocks.{i}.{target}.lora_A.weight``, ``...lora_B.weight``); the base itself is not a submodule (it is
    the recipe's teacher) and is reached through :attr:`base`.
    """

    def __init__(self, base: nn.Module, switch: AdapterSwitch, adapter: str) -> None:
        super().__init__()
        self.__dict__["base"] = base  # not registered: one base, owned by the recipe's teacher slot
        self.__dict__["switch"] = switch
        self.adapter = adapter
        for path, layer in switch.layers.items():
            holder = self._container(path)
            for w in _WEIGHTS:
                holder.add_module(w, getattr(layer, w)[adapter])
        self.scale = next(iter(switch.layers.values())).scaling[adapter]

    def _container(self, path: str) -> nn.Module:
        node: nn.Module = self
        for part in path.split("."):
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        return node

    @property
    def config(self):
        """The base's WanConfig (rollouts and the GAN head read it)."""
        return self.base.config

    def forward(self, *args, **kwargs):
        self.switch.select(self.adapter)
        return self.base(*args, **kwargs)


class BaseNet(nn.Module):
    """The teacher: the shared base with adapters off. It owns the base (registered as ``net``, so moving, sharding
    and checkpoint filtering of the recipe's teacher slot apply to it); calling it selects no adapter first — the
    base itself may have been left running another adapter by the last generator or critic call."""

    def __init__(self, base: nn.Module, switch: AdapterSwitch) -> None:
        super().__init__()
        self.net = base
        self.__dict__["switch"] = switch

    @property
    def config(self):
        return self.net.config

    @property
    def blocks(self):
        return self.net.blocks

    def forward(self, *args, **kwargs):
        self.switch.select(None)
        return self.net(*args, **kwargs)


def _shapes_view(shapes: dict[str, tuple[int, ...]]):
    """An object whose ``state_dict()`` has meta tensors of ``shapes`` (what ``check_state_dict`` compares with)."""

    class _Shapes:
        def state_dict(self):
            return {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    return _Shapes()


def _assign(net: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into ``net``'s (possibly FSDP2-sharded) parameters, non-strictly."""
    if is_sharded(net):
        set_model_state_dict(net, sd, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    own = net.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def load_base_weights(base: nn.Module, source: str | os.PathLike | dict[str, torch.Tensor]) -> None:
    """Load Wan-keyed DiT weights (any source :func:`sfplus.parallel.load_weights` reads) into the peft-wrapped
    ``base``: keys and shapes are checked against the base without its adapters; Wan folders stream file by file."""
    own = {wan_key(k): k for k in base.state_dict() if not is_adapter_key(k)}
    shapes = {w: tuple(base.state_dict()[k].shape) for w, k in own.items()}
    name = "state dict" if isinstance(source, dict) else str(source)
    if isinstance(source, dict) or not os.path.isdir(source) or is_sharded_checkpoint(Path(source)):
        sd = source if isinstance(source, dict) else read_dit_state_dict(source)
        check_state_dict(_shapes_view(shapes), sd, name)
        _assign(base, {own[k]: v for k, v in sd.items()})
        return
    files = locate_weights(source)
    check_state_dict(_shapes_view(shapes), {k: torch.empty(s, device="meta")
                                            for k, s in folder_shapes(files).items()}, name)
    seen: set[str] = set()
    for shard in iter_folder_shards(files):
        _assign(base, {own[k]: v for k, v in shard.items()})
        seen.update(shard)
    if seen != set(own):
        raise CheckpointError(f"weights in {source} left {sorted(set(own) - seen)[:8]} unloaded")


def fresh_adapter(net: LoRANet, seed: int) -> dict[str, torch.Tensor]:
    """A fresh adapter state dict for ``net``, a function of ``seed`` alone (not of world size or device): ``A`` as
    peft initialises it (Kaiming-uniform, ``a = sqrt(5)``), ``B`` zero — so the adapted net starts as the base."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, p in net.state_dict().items():
        shape = tuple(p.shape)
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in]: U(-1/sqrt(in), 1/sqrt(in))
            out[key] = (torch.rand(shape, generator=g) * 2 - 1) * bound
        else:
            out[key] = torch.zeros(shape)
    return out


def set_adapter_state(net: LoRANet, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load an adapter state dict (keys as ``net.state_dict()``) into ``net``, checked strictly, sharded or not."""
    check_state_dict(net, sd, source)
    if is_sharded(net):
        # The adapter's tensors live in the base's FSDP units: load them through the base, under its own keys
        # (``...q.lora_A.weight`` → ``...q.lora_A.<adapter>.weight``).
        full = {}
        for key, value in sd.items():
            path, leaf = key.rsplit(".", 1)
            full[f"{path}.{net.adapter}.{leaf}"] = value
        _assign(net.base, full)
        return
    own = net.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)



def check_lora_recipe(config: LoRA, *, teacher_net, generator_checkpoint, critic_checkpoint, fp8: bool) -> None:
    """Refuse, in one line each, recipe settings that a single shared base cannot honour; and check peft is there."""
    require_peft()
    if teacher_net is not None:
        raise ValueError("lora: the teacher IS the base the adapters sit on; teacher_net (another preset) cannot be "
                         "used with lora")
    for name, value in (("generator_checkpoint", generator_checkpoint), ("critic_checkpoint", critic_checkpoint)):
        if value is not None:
            raise ValueError(f"lora: {name} does not apply (generator and critic are the base + an adapter); start "
                             "the generator's adapter from a LoRA file with lora.generator_init")
    if fp8:
        raise ValueError("lora: scale.fp8 swaps the block linears the adapters wrap; predict from merged weights "
                         "(sfplus export --base ...) for FP8")


def build_lora_nets(base: nn.Module, config: LoRA,
                    frozen_dtype: str | None) -> tuple[BaseNet, LoRANet, LoRANet, LoRANet]:
    """Attach the :data:`ADAPTERS` to ``base`` and return (teacher, generator, critic, generator_ema) nets; the
    generator's and critic's adapters require grad, the EMA's does not; base weights are stored in
    ``frozen_dtype``."""
    switch = attach_adapters(base, config)
    generator, critic, ema = (LoRANet(base, switch, name) for name in ADAPTERS)
    generator.requires_grad_(True)
    critic.requires_grad_(True)
    ema.eval()
    if frozen_dtype:
        adapter = {id(p) for net in (generator, critic, ema) for p in net.parameters()}
        for module in base.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) not in adapter:
                    module._parameters[name] = nn.Parameter(p.data.to(DTYPES[frozen_dtype]), requires_grad=False)
    return BaseNet(base, switch), generator, critic, ema


def load_initial_adapters(generator: LoRANet, critic: LoRANet, ema: LoRANet, config: LoRA,
                          base_weights: str | None, seed: int) -> None:
    """Base from ``base_weights`` (the teacher's file); seeded fresh generator and critic adapters (the generator's
    from ``config.generator_init`` when set); the EMA a copy of the generator's. The same on any world size."""
    if base_weights:
        load_base_weights(generator.base, base_weights)
    gen = fresh_adapter(generator, stable_seed(seed, "lora", "generator") % (2**63))
    if config.generator_init:
        gen = lora_to_adapter(read_lora_file(config.generator_init), gen, generator.scale, config.generator_init)
    set_adapter_state(generator, gen)
    set_adapter_state(critic, fresh_adapter(critic, stable_seed(seed, "lora", "critic") % (2**63)))
    set_adapter_state(ema, gen)
