"""LoRA distillation on one frozen base (DistillModule(lora=...), sfplus.modules.lora): the teacher is the base with
adapters off, the adapters are independent, only adapters are optimised and checkpointed, a resumed run is bitwise the
uninterrupted one, 2 FSDP2 ranks follow one process, and I2V DMD trains the image branch's adapters and exports an
I2V LoRA that diffusers loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    with pytest.raises(ValueError, match=r"^lora.targets adapts cross_attn.v_img alone: adapt cross_attn.k_img and"):
        DistillModule(net="tiny-i2v", lora={"targets": ["cross_attn.q", "cross_attn.v_img"]})
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


def test_i2v_lora_dmd_trains_image_adapters_and_exports_a_diffusers_i2v_lora(tmp_path, one_thread):
    """LoRA DMD on the image-to-video net (issue #19: 'bidirectional DMD (T2V and I2V)'): tiny-i2v with the tiny Wan
    folder's encoders; the adapters include the image branch's k_img / v_img (not in the default targets); the
    teacher is the plain base on an I2V input; `sfplus export` writes an I2V LoRA that reads back and that diffusers'
    WanTransformer3DModel (I2V config) applies as sfplus's generator does."""
    import lightning as L
    from PIL import Image

    from sfplus.cli import main
    from sfplus.conditioning.wan import WanConditioner
    from sfplus.datamodules.images import ImagePromptDataModule
    from sfplus.modules.groups import DEFAULT_LORA_TARGETS
    from sfplus.weights.export import ExportError, export_generator
    from sfplus.weights.lora_files import adapter_to_lora, read_lora_file
    from tests.helpers import TINY_VAE, TINY_WAN_IMAGE, TINY_WAN_TEXT, write_tiny_wan_folder

    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    wan = write_tiny_wan_folder(tmp_path / "Wan2.1-tiny")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        rgb = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
        Image.fromarray(rgb).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a cat number {i}")
    net = {**TINY_WAN_TEXT, **TINY_WAN_IMAGE}
    torch.manual_seed(0)
    plain = build_dit("tiny-i2v", **net).eval()
    plain.init_weights()
    torch.nn.init.normal_(plain.head.head.weight, std=0.02)
    teacher = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(teacher))

    image_targets = ["cross_attn.k_img", "cross_attn.v_img"]
    assert not set(image_targets) & set(DEFAULT_LORA_TARGETS)  # I2V adds them by name
    conditioner = WanConditioner(model_dir=str(wan), i2v=True, num_pixel_frames=5, vae_config=TINY_VAE,
                                 clip_num_heads=2, text_dtype="fp32")
    module = DistillModule(net="tiny-i2v", net_overrides=net, conditioner=conditioner, teacher_checkpoint=str(teacher),
                           video_shape=[16, 2, 2, 2], dfake_gen_update_ratio=2, seed=1,
                           generator_optimizer={"lr": 1e-2}, critic_optimizer={"lr": 1e-2},  # visible adapters
                           lora={"rank": 4, "alpha": 8.0, "targets": [*DEFAULT_LORA_TARGETS, *image_targets]})
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=ImagePromptDataModule(str(images), batch_size=2, size=[16, 16]))
    assert (module.generator_steps, module.critic_steps) == (1, 2)  # G, C, C

    # the image branch's linears carry trained adapters, in the generator and in the critic
    for name in ("generator", "critic"):
        sd = getattr(module, name).state_dict()
        for target in image_targets:
            b = [sd[f"blocks.{i}.{target}.lora_B.weight"] for i in range(2)]
            assert all(v.abs().max() > 0 for v in b), f"{name} {target}: B did not move"

    # the teacher is the plain base (adapters off) on an I2V input; the trained generator is not
    cond = {k: v.float() for k, v in conditioner.image_condition(torch.rand(2, 3, 16, 16) * 2 - 1).items()}
    ctx = conditioner.text(["a cat", "a dog"])["context"]
    x, t = torch.randn(2, 16, 2, 2, 2, generator=torch.Generator().manual_seed(3)), torch.tensor([250.0, 750.0])
    with torch.no_grad():
        gen = module.generator(x, t, ctx, **cond)
        assert torch.equal(module.teacher(x, t, ctx, **cond), plain(x, t, ctx, **cond))
        assert (gen - plain(x, t, ctx, **cond)).abs().max() > 1e-3

    # `sfplus export` of the LoRA checkpoint: one I2V LoRA file (k_img / v_img keys) that reads back exactly
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "lora.safetensors"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--which", "model", "--dtype", "fp32"])
    keys = load_file(str(out)).keys()
    assert {f"diffusion_model.blocks.1.{t}.lora_{w}.weight" for t in image_targets for w in "AB"} <= keys
    lora, want = read_lora_file(out), adapter_to_lora(module.generator.state_dict(), module.generator.scale)
    assert lora.keys() == want.keys() and all(torch.equal(lora[p][i], want[p][i]) for p in want for i in (0, 1))
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "d.safetensors"), "--which", "model",
          "--dtype", "fp32", "--layout", "diffusers"])  # diffusers names: the image branch is attn2.add_k/v_proj
    assert "transformer.blocks.0.attn2.add_v_proj.lora_B.weight" in load_file(str(tmp_path / "d.safetensors"))
    with pytest.raises(ExportError, match=r"^a LoRA is one file: shard_size_gb does not apply"):
        export_generator(str(ckpt), str(tmp_path / "s.safetensors"), shard_size_gb=1.0)
    back = read_lora_file(tmp_path / "d.safetensors")
    assert back.keys() == want.keys() and all(torch.equal(back[p][i], want[p][i]) for p in want for i in (0, 1))

    # diffusers' I2V transformer + the exported LoRA (as WanImageToVideoPipeline.load_lora_weights) = the generator
    diffusers = pytest.importorskip("diffusers")
    from sfplus.weights.diffusers_keys import wan_to_diffusers
    from tests.nets.test_wan_diffusers_parity import _diffusers_model

    theirs = _diffusers_model(plain.config).eval()
    theirs.load_state_dict(wan_to_diffusers(plain.state_dict()), strict=True)
    theirs.load_lora_adapter(diffusers.WanImageToVideoPipeline.lora_state_dict(str(out)), prefix="transformer",
                             adapter_name="distilled")
    assert sum(".add_k_proj.lora_A." in n or ".add_v_proj.lora_A." in n for n, _ in theirs.named_parameters()) == 4
    with torch.no_grad():
        ref = theirs(torch.cat([x, cond["y"]], 1), t, ctx, encoder_hidden_states_image=cond["clip_fea"],
                     return_dict=False)[0]
    torch.testing.assert_close(ref, gen, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # ... including the image adapters: without them the generator is another net
        for name, p in module.generator.named_parameters():
            if "_img.lora_B" in name:
                p.zero_()
        assert (module.generator(x, t, ctx, **cond) - gen).abs().max() > 1e-4
