"""LoRA distillation on one frozen base (DistillModule(lora=...), sfplus.modules.lora): the teacher is the base with
adapters off, the adapters are independent, only adapters are optimised and checkpointed, a resumed run is bitwise the
uninterrupted one, and 2 FSDP2 ranks follow one process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_sharding import WORKER, run

pytest.importorskip("peft")
from sfplus.conditioning.conditioner import ToyConditioner  # noqa: E402
from sfplus.modules import DistillModule  # noqa: E402
from sfplus.nets.presets import build_dit  # noqa: E402
from tests.helpers import TINY, write_tiny_teacher  # noqa: E402

ADAPTERS = ("generator", "critic", "generator_ema")


def _module(tmp_path, **kw) -> DistillModule:
    teacher = write_tiny_teacher(tmp_path / "teacher.safetensors")
    module = DistillModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                           teacher_checkpoint=teacher, video_shape=[3, 2, 4, 4], lora={"rank": 4, "alpha": 8.0},
                           **kw)
    module.configure_model()
    return module


def test_teacher_is_the_base_with_adapters_off_and_adapters_are_independent(tmp_path):
    module = _module(tmp_path)
    plain = build_dit("tiny", **TINY)
    plain.load_state_dict(load_file(str(tmp_path / "teacher.safetensors")))
    x, t, ctx = torch.randn(2, 3, 2, 4, 4), torch.tensor([200.0, 700.0]), torch.randn(2, 8, 16)
    with torch.no_grad():
        module.critic(x, t, ctx)  # leave another adapter selected: the teacher must still be the plain base
        assert torch.equal(module.teacher(x, t, ctx), plain(x, t, ctx))
        # B starts at 0: generator and critic start as the teacher
        assert torch.equal(module.generator(x, t, ctx), plain(x, t, ctx))
        for p in module.generator.parameters():
            if p.shape[1] == 4:  # lora_B [out, rank]
                p.add_(0.05)
        gen = module.generator(x, t, ctx)
        assert not torch.allclose(gen, plain(x, t, ctx))
        assert torch.equal(module.critic(x, t, ctx), plain(x, t, ctx)), "the critic does not see the generator's B"
        module.generator(x, t, ctx)
        assert torch.equal(module.teacher(x, t, ctx), plain(x, t, ctx)), "the teacher runs without the adapter"
    # one base: every weight of the base is one tensor, shared by teacher, generator and critic
    assert sum(p.numel() for p in module.parameters()) < plain.num_parameters() * 1.5
    adapter = {id(p) for name in ADAPTERS for p in getattr(module, name).parameters()}
    assert len(adapter) == 3 * len(list(module.generator.parameters()))
    assert {id(p) for p in module.teacher.net.parameters() if p.requires_grad} == \
        {id(p) for n in ("generator", "critic") for p in getattr(module, n).parameters()}


def test_optimizers_and_checkpoints_hold_adapters_only(tmp_path):
    module = _module(tmp_path)
    g, c = module.configure_optimizers()
    assert [id(p) for p in g.param_groups[0]["params"]] == [id(p) for p in module.generator.parameters()]
    assert [id(p) for p in c.param_groups[0]["params"]] == [id(p) for p in module.critic.parameters()]
    sd = module.state_dict()
    assert sd and all(".lora_A." in k or ".lora_B." in k for k in sd), [k for k in sd if ".lora_" not in k][:3]
    assert {k.split(".")[0] for k in sd} == set(ADAPTERS)
    # loading a checkpoint's adapters puts them in the shared base (the teacher slot's copies do not win)
    changed = {k: v + 1.0 for k, v in sd.items()}
    module.load_state_dict(changed)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in changed.items())


def test_lora_config_errors_are_one_line():
    with pytest.raises(ValueError, match="lora.rank must be a positive int"):
        DistillModule(net="tiny", lora={"rank": 0})
    with pytest.raises(ValueError, match=r"lora.targets \['attn.q'\] not adaptable"):
        DistillModule(net="tiny", lora={"targets": ["attn.q"]})
    with pytest.raises(ValueError, match="generator_checkpoint does not apply"):
        DistillModule(net="tiny", lora={}, generator_checkpoint="g.safetensors")


def test_missing_peft_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"^LoRA distillation needs peft: pip install 'sfplus\[lora\]'$"):
        DistillModule(net="tiny", lora={})


@pytest.mark.slow
def test_lora_run_resumes_bitwise_and_two_ranks_follow_one(tmp_path):
    assert WORKER.exists()
    full = run(tmp_path / "full.pt", steps=4, batch=4, nproc=1, variant="lora-dmd")
    run(tmp_path / "half.pt", steps=2, batch=4, nproc=1, variant="lora-dmd", ckpt_out=str(tmp_path / "half.ckpt"))
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=True)
    assert all(".lora_" in k for k in ckpt["state_dict"]), "checkpoints hold adapters only"
    assert ckpt["sfplus"]["lora"]["scale"] == 2.0
    resumed = run(tmp_path / "resumed.pt", steps=4, batch=4, nproc=1, ckpt_in=str(tmp_path / "half.ckpt"),
                  variant="lora-dmd")
    assert resumed["counters"] == full["counters"]
    for name in ADAPTERS:
        assert all(torch.equal(resumed[name][k], full[name][k]) for k in full[name]), name
    teacher = load_file(str(tmp_path / "teacher.safetensors"))
    base = {k.replace(".base_layer.", "."): v for k, v in full["base"].items()}
    assert base.keys() == teacher.keys() and all(torch.equal(base[k], teacher[k]) for k in teacher), "base moved"
    assert max(v.abs().max() for k, v in full["generator"].items() if "lora_B" in k) > 1e-4, "generator moved"
    # 2 gloo ranks (FSDP2 over the shared base, activation checkpointing with the adapter-restoring recompute)
    sharded = run(tmp_path / "sharded.pt", steps=4, batch=2, nproc=2, variant="lora-dmd")
    assert sharded["counters"] == full["counters"]
    for name in ADAPTERS:
        for k in full[name]:
            torch.testing.assert_close(sharded[name][k], full[name][k], atol=1e-5, rtol=1e-4, msg=f"{name}.{k}")
