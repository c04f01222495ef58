"""One GPU, the real code path at scale: DistillModule through Lightning's ModelParallelStrategy (FSDP2 per block
and per net, meta-device build, activation checkpointing, bf16 compute, fp32 master weights), random weights.

    python tools/scale_check.py --preset wan2.1-t2v-1.3b --generator-type bidirectional --steps 4

Prints one JSON row per run: seconds per optimizer update (generator and critic), peak memory, and the memory
planner's estimate for the same set-up. ``--tiny`` runs the same path on CPU with the tiny preset (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.modules import DistillModule
from sfplus.plan import plan


class _Prompts(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> dict:
        return {"prompts": f"a prompt number {i}"}


def _collate(items: list[dict]) -> dict:
    return {"prompts": [it["prompts"] for it in items]}


class _Timer(L.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.rows.append((module.last_update or "none", time.perf_counter() - self._t))


def run(preset: str, generator_type: str, steps: int, tiny: bool) -> dict:
    cuda = torch.cuda.is_available() and not tiny
    overrides = {"in_dim": 3, "out_dim": 3} if tiny else {}
    text_dim, text_len = (16, 8) if tiny else (4096, 512)
    shape = [3, 3, 4, 4] if tiny else [16, 21, 60, 104]
    module = DistillModule(
        net=preset, net_overrides=overrides, conditioner=ToyConditioner(text_dim=text_dim, text_len=text_len),
        causal={"frames_per_block": 3} if generator_type == "causal" else None,
        dfake_gen_update_ratio=2, video_shape=shape,
        scale={"activation_checkpointing": True, "param_dtype": "bf16" if cuda else "fp32", "frozen_dtype": "bf16"},
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, inference_mode=False, callbacks=[timer],
        precision="bf16-mixed" if cuda else "32-true",
    )
    trainer.fit(module, DataLoader(_Prompts(), batch_size=1, collate_fn=_collate))
    by_kind: dict[str, list[float]] = {}
    for kind, seconds in timer.rows[1:]:  # the first update pays for warm-up
        by_kind.setdefault(kind, []).append(round(seconds, 3))
    row = {"name": f"fit_{generator_type}", "preset": preset, "precision": trainer.precision,
           "updates": len(timer.rows), "seconds": by_kind,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    if not tiny:
        estimate = plan(generator=preset, critic=preset, teacher=preset, gpus=1, gpu_memory_gib=139,
                        latent_shape=shape, activation_checkpointing=True, offload_encoders=True,
                        causal_frames_per_block=3 if generator_type == "causal" else None)
        row["planner_gib"] = round(estimate.total_gib, 2)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--generator-type", default="bidirectional", choices=["bidirectional", "causal"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    run("tiny" if args.tiny else args.preset, args.generator_type, args.steps, args.tiny)


if __name__ == "__main__":
    main()
