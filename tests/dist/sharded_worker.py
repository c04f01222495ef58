"""Worker for tests/test_sharding.py and tests/test_sequence_parallel_run.py: a tiny training run (distillation by
default), optionally sharded with FSDP2 over gloo processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist/sharded_worker.py OUT.pt STEPS BATCH [CKPT_IN] [CKPT_OUT]

Environment: ``SFPLUS_TEST_VARIANT`` picks the recipe (:data:`VARIANTS`: DMD, SiD or CausVid, bidirectional or
causal, with or without the GAN head; ODE initialisation; causal diffusion with teacher forcing; default ``dmd``),
``SFPLUS_TEST_PARAM_DTYPE`` the FSDP2 compute dtype (``fp32`` default, or ``bf16``, which also runs the trainer in
``bf16-mixed`` as the shipped Wan configs do), ``SFPLUS_TEST_SP`` the sequence-parallel group size (default 1; the
ranks form a (world / sp) x sp mesh, BATCH is per data-parallel rank).
A comma-separated ``SFPLUS_TEST_VARIANT`` trains each variant in turn in the same processes (one launch).

Writes the full (gathered) generator, EMA and critic (and GAN head) state dicts and the counters to OUT.pt on rank 0
(the one-net recipes: their ``model`` and ``model_ema`` as ``generator`` and ``generator_ema``); with several
variants, a dict of those by variant name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sfplus.callbacks import EMA
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import LatentShardDataModule, PromptDataModule
from sfplus.modules import DiffusionModule, DistillModule, ODEInitModule
from sfplus.nets.presets import build_dit

TINY = {"in_dim": 3, "out_dim": 3}
#: recipe options of each variant; the causal ones roll out 2 blocks of 1 latent frame with the KV cache.
VARIANTS = {
    "dmd": {},
    "sid": {"distribution_loss": "sid"},
    "causal-dmd": {"causal": {"frames_per_block": 1}},
    "causal-sid": {"causal": {"frames_per_block": 1}, "distribution_loss": "sid"},
    "causal-dmd-gan": {"causal": {"frames_per_block": 1},
                       "gan": {"blocks": [0, 1], "g_weight": 0.1, "d_weight": 0.1}},
    # LoRA on one shared base (sfplus.modules.lora): bidirectional DMD, causal SiD with the GAN head.
    "lora-dmd": {"lora": {"rank": 4, "alpha": 8.0}},
    "lora-causal-sid-gan": {"causal": {"frames_per_block": 1}, "distribution_loss": "sid", "lora": {"rank": 4},
                            "gan": {"blocks": [0, 1], "g_weight": 0.1, "d_weight": 0.1}},
    # CausVid: one block-causal generator step from data-simulated inputs with clean context.
    "causvid-tf": {"causal": {"frames_per_block": 1}, "distribution_loss": "causvid", "teacher_forcing": True},
    # One-net recipes ("recipe" picks the module): ODE regression onto stored trajectories (block-causal, one
    # snapshot per block) and causal diffusion (a timestep per block), with teacher forcing (noise-augmented
    # clean context) or without.
    "ode": {"recipe": "ode", "causal": {"frames_per_block": 1}},
    "causal-diffusion": {"recipe": "diffusion", "causal": {"frames_per_block": 1}},
    "causal-diffusion-tf": {"recipe": "diffusion", "causal": {"frames_per_block": 1}, "teacher_forcing": True,
                            "noise_augmentation_max_timestep": 100},
}
SHAPE = [3, 2, 4, 4]


def make_inputs(root: Path) -> tuple[str, str]:
    teacher, prompts = root / "teacher.safetensors", root / "prompts.txt"
    if not teacher.exists():
        torch.manual_seed(0)
        net = build_dit("tiny", **TINY)
        net.init_weights()
        torch.nn.init.normal_(net.head.head.weight, std=0.02)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(teacher))
        prompts.write_text("\n".join(f"a {c} square moving {d}" for c in ("red", "blue", "green") for d in ("left", "up")))
    return str(teacher), str(prompts)


def latent_shards(root: Path) -> str:
    """Clean latents for the recipes that read real data (the GAN term)."""
    from sfplus.datamodules.shard_format import Sample, write_shards

    out = root / "shards"
    if not (out / "index.json").exists():
        g = torch.Generator().manual_seed(0)
        samples = [Sample(key=f"s{i}", prompt=f"a red square moving {i}", latent=torch.randn(SHAPE, generator=g))
                   for i in range(6)]
        write_shards(samples, out, [3, 3], dtype=torch.float32)
    return str(out)


def ode_shards(root: Path) -> str:
    """Straight-line trajectories at ODEInitModule's default steps (noisiest first, then clean)."""
    from sfplus.datamodules.shard_format import Sample, write_shards
    from sfplus.modules.ode import ODE_SCHEDULE

    out = root / "ode_shards"
    if not (out / "index.json").exists():
        g = torch.Generator().manual_seed(0)
        timesteps = torch.tensor([*ODE_SCHEDULE.timesteps, 0.0])
        sigma = (timesteps / 1000).view(-1, 1, 1, 1, 1)
        samples = []
        for i in range(6):
            x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
            samples.append(Sample(key=f"s{i}", prompt=f"a red square moving {i}", ode=(1 - sigma) * x0 + sigma * eps,
                                  ode_timesteps=timesteps))
        write_shards(samples, out, [3, 3], dtype=torch.float32)
    return str(out)


def build(variant: dict, teacher: str, scale: dict):
    """The recipe's module and the name of the data it reads (``prompts``, ``latents`` or ``ode``)."""
    variant = dict(variant)
    recipe = variant.pop("recipe", "distill")
    common = {"net": "tiny", "net_overrides": TINY, "conditioner": ToyConditioner(text_dim=16, text_len=8),
              "video_shape": SHAPE, "seed": 5, "scale": scale, **variant}
    if recipe == "ode":
        return ODEInitModule(init_checkpoint=teacher, optimizer={"lr": 1e-3}, **common), "ode"
    if recipe == "diffusion":
        return DiffusionModule(init_checkpoint=teacher, optimizer={"lr": 1e-3}, **common), "latents"
    module = DistillModule(teacher_checkpoint=teacher, dfake_gen_update_ratio=2, generator_optimizer={"lr": 1e-3},
                           critic_optimizer={"lr": 1e-3}, **common)
    return module, "latents" if module.needs_real_latents else "prompts"


def full_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    if any(hasattr(p, "to_local") for p in net.parameters()):
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def lora_states(module) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's state dict (keys as its LoRANet's) and the base's own weights ("base"), gathered."""
    full = full_state(module.teacher.net)
    out = {"base": {k: v for k, v in full.items() if ".lora_" not in k}}
    for name in ("generator", "critic", "generator_ema"):
        tag = f".{name}."
        out[name] = {k.replace(tag, "."): v for k, v in full.items()
                     if (f".lora_A{tag}" in k or f".lora_B{tag}" in k)}
    return out


def main() -> None:
    out, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ckpt_in = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    ckpt_out = sys.argv[5] if len(sys.argv) > 5 else None
    names = os.environ.get("SFPLUS_TEST_VARIANT", "dmd").split(",")
    # Several variants (no checkpoints): one run after the other in this process, OUT.pt then maps each to its own.
    results = {name: train(VARIANTS[name], out.parent, steps, batch, ckpt_in, ckpt_out) for name in names}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results[names[0]] if len(names) == 1 else results, out)
    exit_in_step()


def train(variant: dict, root: Path, steps: int, batch: int, ckpt_in: str | None, ckpt_out: str | None) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    param_dtype = os.environ.get("SFPLUS_TEST_PARAM_DTYPE", "fp32")
    sp = int(os.environ.get("SFPLUS_TEST_SP", "1"))
    teacher, prompts = make_inputs(root)
    module, reads = build(variant, teacher,
                          {"param_dtype": param_dtype, "activation_checkpointing": world > 1, "sequence_parallel": sp})
    if reads == "latents":
        data = LatentShardDataModule(latent_shards(root), batch_size=batch, fields=["latents"], num_workers=0,
                                     batches_per_epoch=3)
    elif reads == "ode":
        data = LatentShardDataModule(ode_shards(root), batch_size=batch, fields=["ode_latents"], num_workers=0,
                                     batches_per_epoch=3)
    else:
        data = PromptDataModule(prompts, batch_size=batch, batches_per_epoch=3)
    strategy = ModelParallelStrategy(data_parallel_size=world // sp, tensor_parallel_size=sp) if world > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, inference_mode=False, callbacks=[EMA(decay=0.5, start_iteration=1)],
        default_root_dir=str(root), precision="bf16-mixed" if param_dtype == "bf16" else "32-true",
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    if not isinstance(module, DistillModule):  # one net and its EMA
        states = {"generator": full_state(module.model), "generator_ema": full_state(module.model_ema)}
    elif module.lora is not None:  # the adapters live in the base's FSDP units: gather the base, split by adapter
        states = lora_states(module)
        states.update({"disc_head": full_state(module.disc_head)} if module.disc_head is not None else {})
    else:
        nets = ("generator", "generator_ema", "critic") + (("disc_head",) if module.disc_head is not None else ())
        states = {name: full_state(getattr(module, name)) for name in nets}
    return {**states, "counters": module.counters()}


def exit_in_step() -> None:
    """Leave once every rank has written what it had to, without tearing gloo down.

    Rarely (once in CI; not in 60 runs here), a rank aborted in the C++ teardown of the process group after all
    the work was done ("terminate called without an active exception"), with or without an explicit
    destroy_process_group; the launcher then failed the run. The barrier proves every rank finished; _exit skips
    the teardown where that race lives. (The test checks the files this run wrote, not how the process ended.)
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
