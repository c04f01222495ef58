"""Does Lightning's FSDP support run the alternating generator/critic manual optimization that sfplus needs?
Three variants on one GPU (world size 1 still wraps with FSDP and takes the same code path):
  A  FSDPStrategy, Lightning auto-wraps the LightningModule (FSDP1)
  B  FSDPStrategy, each model wrapped by hand inside configure_model (FSDP1)
  C  ModelParallelStrategy, fully_shard (FSDP2) per block and per model inside configure_model
  D  no sharding (plain single device): the ground truth the others must match
  A2/B2/C2/D2  the same without Lightning's toggled_optimizer around the generator step
Prints one line per variant: ok with the losses, or the error. Needs one CUDA GPU (FSDPStrategy runs only there):
    python tools/fsdp_strategy_check.py A B C D
Measured on one H200 (lightning 2.6.6, torch 2.11), (critic, generator) losses of the 4 updates: A leaves D after the
first update, B and C follow it within bf16 rounding (the table is in the README, "Real models, scale, data, speed").
This is why `sfplus` refuses `strategy: fsdp` and shards with ModelParallelStrategy (FSDP2 in configure_model)."""
import contextlib
import sys
import traceback

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.wrap import wrap


class Block(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.lin2(torch.nn.functional.gelu(self.lin1(x)))


def net():
    return nn.Sequential(Block(), Block())


class Distill(L.LightningModule):
    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.automatic_optimization = False
        self.gen, self.critic, self.teacher = net(), net(), net()
        self.teacher.requires_grad_(False)
        self.losses = []

    def configure_model(self):
        if self.variant.startswith("B"):
            self.gen, self.critic, self.teacher = wrap(self.gen), wrap(self.critic), wrap(self.teacher)
        elif self.variant.startswith("C"):
            mesh = self.device_mesh["data_parallel"]
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for m in (self.gen, self.critic, self.teacher):
                for blk in m:
                    fully_shard(blk, mesh=mesh, mp_policy=mp)
                fully_shard(m, mesh=mesh, mp_policy=mp)

    def training_step(self, batch, batch_idx):
        g_opt, c_opt = self.optimizers()
        x = batch[0]
        with torch.no_grad():
            fake = self.gen(x)
        c_loss = (self.critic(fake) - fake).pow(2).mean()
        c_opt.zero_grad(set_to_none=True)
        self.manual_backward(c_loss)
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 10.0)
        c_opt.step()
        toggle = contextlib.nullcontext() if self.variant.endswith("2") else self.toggled_optimizer(g_opt)
        with toggle:
            fake = self.gen(x)
            g_loss = (self.critic(fake) - self.teacher(fake)).pow(2).mean()
            g_opt.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            torch.nn.utils.clip_grad_norm_(self.gen.parameters(), 10.0)
            g_opt.step()
        self.losses.append((round(c_loss.item(), 4), round(g_loss.item(), 4)))

    def configure_optimizers(self):
        return (torch.optim.AdamW(self.gen.parameters(), lr=1e-3, betas=(0.0, 0.999)),
                torch.optim.AdamW(self.critic.parameters(), lr=1e-3, betas=(0.0, 0.999)))


def run(variant):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 16, 256))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    if variant in ("A", "A2"):
        strategy = FSDPStrategy(auto_wrap_policy={Block})
    elif variant.startswith("B"):
        strategy = FSDPStrategy()
    elif variant.startswith("C"):
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    else:  # D: no sharding at all, the ground truth
        strategy = "auto"
    model = Distill(variant)
    trainer = L.Trainer(accelerator="cuda", devices=1, strategy=strategy, max_epochs=1,
                        precision="32-true" if variant.startswith("C") else "bf16-mixed",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False)
    trainer.fit(model, loader)
    return model.losses


if __name__ == "__main__":
    print("lightning", L.__version__, "torch", torch.__version__, flush=True)
    for v in sys.argv[1:] or ["A", "B", "C"]:
        try:
            print(v, "ok", run(v), flush=True)
        except Exception as e:  # report and go on to the next variant
            tb = traceback.format_exc().strip().splitlines()
            print(v, "FAILED", repr(e)[:300], "|", " / ".join(tb[-3:])[:500], flush=True)
