"""Worker for tests/test_sharding.py: a tiny DMD run, optionally sharded with FSDP2 over 2 gloo processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist/sharded_worker.py OUT.pt STEPS BATCH [CKPT_IN] [CKPT_OUT]

Writes the full (gathered) generator, EMA and critic state dicts and the counters to OUT.pt on rank 0.
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
from sfplus.conditioning import ToyConditioner
from sfplus.datamodules import PromptDataModule
from sfplus.modules import DistillModule
from sfplus.nets.presets import build_dit

TINY = {"in_dim": 3, "out_dim": 3}


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


def full_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    if any(hasattr(p, "to_local") for p in net.parameters()):
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def main() -> None:
    out, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ckpt_in = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    ckpt_out = sys.argv[5] if len(sys.argv) > 5 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    teacher, prompts = make_inputs(out.parent)
    module = DistillModule(
        net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
        teacher_checkpoint=teacher, dfake_gen_update_ratio=2, generator_lr=1e-3, critic_lr=1e-3,
        video_shape=[3, 2, 4, 4], seed=5, scale={"param_dtype": os.environ.get("SFPLUS_TEST_PARAM_DTYPE", "fp32"), "activation_checkpointing": world > 1},
    )
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, inference_mode=False, callbacks=[EMA(decay=0.5, start_iteration=1)],
        default_root_dir=str(out.parent),
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts, batch_size=batch, batches_per_epoch=3), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    states = {name: full_state(getattr(module, name)) for name in ("generator", "generator_ema", "critic")}
    if trainer.global_rank == 0:
        torch.save({**states, "counters": module.counters()}, out)
    exit_in_step()


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
