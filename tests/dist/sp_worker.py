"""Worker for tests/nets/test_sequence_parallel.py: WanDiT with Ulysses sequence parallelism over the gloo ranks of
this launch, against the same net run whole in this process (every rank computes the reference itself).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist/sp_worker.py OUT.json

For each call mode — full attention, block-causal, teacher forcing, KV-cache stepping (a no-grad rollout, then a
grad-enabled block under activation checkpointing) — it records the largest difference between the SP and the
reference outputs, and between the rank-mean of the SP gradients (what FSDP2 reduces) and the reference gradients
of every parameter and of the inputs. Rank 0 writes {mode: {"out": d, "grad": d, "grad_norm": n}} to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from sfplus.nets.causal import BlockCausal, KVCache
from sfplus.nets.sequence_parallel import SPGroup, enable_sequence_parallel
from sfplus.nets.wan import WanConfig, WanDiT
from sfplus.parallel import apply_activation_checkpointing

# 4 heads (2 per rank at sp=2), frames of 2x3 tokens after the 2x2 patch (6 per frame: 3 per rank).
CONFIG = WanConfig(dim=48, ffn_dim=64, num_heads=4, num_layers=2, in_dim=3, out_dim=3, text_dim=16, text_len=8)
B, F, H, W = 2, 4, 4, 6


def build(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    net = WanDiT(CONFIG)
    net.init_weights()
    torch.nn.init.normal_(net.head.head.weight, std=0.1)  # init zeroes the head: no gradient would reach the blocks
    return net


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, 3, F, H, W, generator=g, dtype=torch.float32),
        "clean": torch.randn(B, 3, F, H, W, generator=g, dtype=torch.float32),
        "t": torch.rand(B, F, generator=g, dtype=torch.float32) * 1000,
        "context": torch.randn(B, 5, 16, generator=g, dtype=torch.float32),
        "probe": torch.randn(B, 3, F, H, W, generator=g, dtype=torch.float32),
    }


def run_full(net, d):
    return net(d["x"], d["t"][:, 0], d["context"])


def run_causal(net, d):
    flow, hidden = net(d["x"], d["t"], d["context"], causal=BlockCausal(2, backend="sdpa"), return_hidden=(0, 1))
    return flow + hidden[1].mean() + hidden[0].sum() * 1e-3  # the hidden outputs (GAN features) take part too


def run_teacher_forcing(net, d):
    return net(d["x"], d["t"], d["context"], causal=BlockCausal(1, independent_first_frame=True, backend="sdpa"),
               clean_x=d["clean"])


def run_kv_cache(net, d):
    """A 3-block rollout of 1, 2, 1 frames without grad (cache filled), then the last block again with grad, as a
    Self-Forcing generator step does (the cache's past keys are detached)."""
    cache = KVCache(CONFIG, B, F, (H // 2) * (W // 2), local_window_frames=3, sink_frames=1)
    with torch.no_grad():
        for start, stop in ((0, 1), (1, 3), (3, 4)):
            net(d["x"][:, :, start:stop], d["t"][:, start:stop], d["context"], kv_cache=cache, frame_offset=start)
    return net(d["x"][:, :, 3:4], d["t"][:, 3:4], d["context"], kv_cache=cache, frame_offset=3)


MODES = {"full": run_full, "block_causal": run_causal, "teacher_forcing": run_teacher_forcing,
         "kv_cache": run_kv_cache}


def forward_backward(net, mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    d = inputs()
    for key in ("x", "clean", "context"):
        d[key].requires_grad_(True)
    out = MODES[mode](net, d)
    (out * d["probe"][:, :, : out.shape[2]]).sum().backward()
    grads = [p.grad for p in net.parameters()] + [d[k].grad for k in ("x", "clean", "context")]
    return out.detach(), [torch.zeros(()) if g is None else g for g in grads]


def main() -> None:
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    group = SPGroup.from_group(dist.group.WORLD)
    results = {}
    for mode in MODES:
        reference = build()
        sharded = enable_sequence_parallel(build(), group)
        if mode == "kv_cache":  # the recompute in backward must re-read the same cache contents
            apply_activation_checkpointing(sharded)
        ref_out, ref_grads = forward_backward(reference, mode)
        sp_out, sp_grads = forward_backward(sharded, mode)
        grad_diff = 0.0
        for r, s in zip(ref_grads, sp_grads):
            s = s.clone()
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
            grad_diff = max(grad_diff, float((s / group.size - r).abs().max()))
        results[mode] = {"out": float((sp_out - ref_out).abs().max()), "grad": grad_diff,
                         "out_norm": float(ref_out.abs().max()),
                         "grad_norm": max(float(g.abs().max()) for g in ref_grads)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown (see tests/dist/sharded_worker.py, exit_in_step)


if __name__ == "__main__":
    main()
