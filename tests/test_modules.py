"""The recipes end to end on tiny nets: DMD update schedule, counters, exact resume, clear checkpoint errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import save_file

from sfplus.callbacks import EMA
from sfplus.conditioning.conditioner import ToyConditioner
from sfplus.datamodules import PromptDataModule, ToyDataModule
from sfplus.modules import DiffusionModule, DistillModule
from sfplus.nets.presets import build_dit
from sfplus.weights.checkpoints import CheckpointError
from tests.helpers import TINY, write_tiny_teacher

SHAPE = [3, 2, 4, 4]


@pytest.fixture()
def teacher_file(tmp_path: Path) -> str:
    return write_tiny_teacher(tmp_path / "teacher.safetensors")


@pytest.fixture()
def prompt_file(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    directions = ["left", "right", "up", "down"] * 3
    path.write_text("\n".join(f"a red square moving {d} {i}" for i, d in enumerate(directions)))
    return str(path)


def distill(teacher: str, **kw) -> DistillModule:
    args = dict(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                teacher_checkpoint=teacher, dfake_gen_update_ratio=2,
                generator_optimizer={"lr": 1e-3}, critic_optimizer={"lr": 1e-3},
                video_shape=SHAPE, seed=3)
    args.update(kw)
    return DistillModule(**args)


def trainer(tmp_path: Path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=str(tmp_path), callbacks=[EMA(decay=0.5, start_iteration=1)], **kw,
    )


def test_dmd_schedule_and_counters(tmp_path, teacher_file, prompt_file):
    module = distill(teacher_file)
    data = PromptDataModule(prompt_file, batch_size=2, batches_per_epoch=4)
    trainer(tmp_path, 9).fit(module, datamodule=data)
    # One update per batch: a generator update before the critic's at iterations 0, 2, 4 (ratio 2):
    # G C | C | G C | C | G C | C  = 3 generator + 6 critic updates in 9 batches.
    assert module.critic_steps == module.iteration == 6
    assert module.generator_steps == 3
    assert module.ema_started
    # Teacher frozen and untouched; generator moved away from it; EMA between.
    teacher = build_dit("tiny", **TINY)
    from safetensors.torch import load_file

    teacher.load_state_dict(load_file(teacher_file))
    for (name, p), q in zip(module.teacher.named_parameters(), teacher.parameters()):
        assert torch.equal(p, q), name
        assert not p.requires_grad
    moved = sum((p - q).abs().sum() for p, q in zip(module.generator.parameters(), teacher.parameters()))
    assert moved > 0


def _snapshot(module: DistillModule, trainer_: L.Trainer) -> dict:
    opt_states = [o.state_dict() for o in trainer_.optimizers]
    return {
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "opt": opt_states,
        "counters": module.counters(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for oa, ob in zip(a["opt"], b["opt"]):
        for pid, st in oa["state"].items():
            for name, val in st.items():
                assert torch.equal(val, ob["state"][pid][name]), (pid, name)


def test_exact_resume_distill(tmp_path, teacher_file, prompt_file):
    """N+M updates straight == N updates, checkpoint, resume, M updates (weights, EMA, optimizers, counters)."""
    data = lambda: PromptDataModule(prompt_file, batch_size=2, batches_per_epoch=3)  # noqa: E731
    straight = distill(teacher_file)
    t_straight = trainer(tmp_path / "a", 8)
    t_straight.fit(straight, datamodule=data())

    first = distill(teacher_file)
    t_first = trainer(tmp_path / "b", 4)  # stops mid-epoch (3 batches per epoch)
    t_first.fit(first, datamodule=data())
    ckpt = tmp_path / "mid.ckpt"
    t_first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"]), "the frozen teacher is not saved"

    resumed = distill(teacher_file)
    t_resumed = trainer(tmp_path / "c", 8)
    t_resumed.fit(resumed, datamodule=data(), ckpt_path=str(ckpt))
    _assert_same(_snapshot(straight, t_straight), _snapshot(resumed, t_resumed))


def test_exact_resume_diffusion(tmp_path):
    def run(max_steps, ckpt=None, root="x"):
        # Per-frame timesteps on half the samples: their draws must resume exactly too.
        module = DiffusionModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                                 video_shape=SHAPE, seed=1, frame_timestep_prob=0.5)
        data = ToyDataModule(frames=2, height=8, width=8, size=3, batch_size=4, length=64, batches_per_epoch=3)
        tr = trainer(tmp_path / root, max_steps)
        tr.fit(module, datamodule=data, ckpt_path=ckpt)
        return module, tr

    straight, t_straight = run(5, root="a")
    first, t_first = run(2, root="b")
    ckpt = tmp_path / "d.ckpt"
    t_first.save_checkpoint(ckpt)
    resumed, t_resumed = run(5, ckpt=str(ckpt), root="c")
    _assert_same(_snapshot(straight, t_straight), _snapshot(resumed, t_resumed))


def test_checkpoint_of_other_model_is_a_clear_error(tmp_path, teacher_file, prompt_file):
    first = DiffusionModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                            video_shape=SHAPE)
    data = ToyDataModule(frames=2, height=8, width=8, size=3, batch_size=2, length=8)
    tr = trainer(tmp_path / "a", 1)
    tr.fit(first, datamodule=data)
    ckpt = tmp_path / "diffusion.ckpt"
    tr.save_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="does not match this DistillModule"):
        trainer(tmp_path / "b", 2).fit(distill(teacher_file), datamodule=PromptDataModule(prompt_file),
                                       ckpt_path=str(ckpt))


def test_teacher_checkpoint_of_wrong_size_names_keys(tmp_path, prompt_file):
    wrong = build_dit("tiny", in_dim=3, out_dim=3, dim=64, ffn_dim=64, num_heads=2)
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="shape mismatch: .*patch_embedding.weight"):
        trainer(tmp_path, 1).fit(distill(str(path)), datamodule=PromptDataModule(prompt_file))


def test_compile_blocks_gives_the_eager_output():
    from sfplus.parallel import compile_blocks

    torch.manual_seed(0)
    net = build_dit("tiny", **TINY)
    x, t, ctx = torch.randn(1, 3, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 16)
    with torch.no_grad():
        eager = net(x, t, ctx)
        compiled = compile_blocks(net, backend="eager")(x, t, ctx)
    torch.testing.assert_close(compiled, eager)


def test_compiled_checkpointed_training_equals_eager(tmp_path, teacher_file, prompt_file, monkeypatch):
    """`scale: {compile, activation_checkpointing}` together train exactly like eager (dynamo's eager backend:
    what is tested is the wrapping order, which Inductor shares)."""
    import sfplus.parallel as parallel

    compile_blocks = parallel.compile_blocks
    monkeypatch.setattr(parallel, "compile_blocks", lambda net: compile_blocks(net, backend="eager"))
    weights = []
    for i, compile_ in enumerate([False, True]):
        torch._dynamo.reset()
        module = distill(teacher_file, scale={"compile": compile_, "activation_checkpointing": True})
        data = PromptDataModule(prompt_file, batch_size=2, batches_per_epoch=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trainer(tmp_path / str(i), 3).fit(module, datamodule=data)
        weights.append({k: v.clone() for k, v in module.generator.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-5, rtol=1e-4, msg=key)


def test_fp8_predict_quantizes_after_loading_and_refuses_training(tmp_path, teacher_file, prompt_file):
    from sfplus.nets.fp8 import Fp8Linear

    kw = dict(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
              video_shape=SHAPE, sample_steps=2)
    plain, fp8 = DiffusionModule(**kw), DiffusionModule(**kw, scale={"fp8": True})
    plain.configure_model(), fp8.configure_model()  # build the nets now (Lightning would, lazily)
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh net's zero head would make any two nets agree
        for param in plain.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    fp8.load_state_dict(plain.state_dict())
    data = PromptDataModule(prompt_file, batch_size=2)
    out = [trainer(tmp_path / name, 1).predict(m, datamodule=data) for name, m in (("a", plain), ("b", fp8))]
    assert isinstance(fp8.model_ema.blocks[0].ffn[0], Fp8Linear)
    assert type(plain.model_ema.blocks[0].ffn[0]) is torch.nn.Linear
    a, b = (torch.cat([r["latents"] for r in o]).float() for o in out)
    assert a.shape == b.shape and torch.isfinite(b).all() and not torch.equal(a, b)
    assert (a - b).norm() / a.norm() < 0.2  # close: the same weights, 8-bit matmuls
    with pytest.raises(ValueError, match="scale.fp8 is for predict only"):
        trainer(tmp_path / "c", 1).fit(DiffusionModule(**kw, scale={"fp8": True}), datamodule=data)


def test_unknown_scale_option_is_named():
    with pytest.raises(ValueError, match="unknown scale option\\(s\\) \\['compiled'\\]"):
        DiffusionModule(net="tiny", scale={"compiled": True})


def test_typed_groups_are_checked_and_printed_by_the_cli(capsys):
    """scale and gan are dataclasses: --print_config shows every default, a wrong key or type is named."""
    from sfplus.cli import main

    dmd = str(Path(__file__).resolve().parent.parent / "configs" / "toy" / "gan.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", dmd, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["scale"]["accumulate_grad_batches"] == 1 and printed["scale"]["param_dtype"] == "bf16"
    assert printed["gan"]["warmup_steps"] == 0 and printed["gan"]["tokens_per_block"] == 1
    for bad in ("--model.init_args.scale.compiled=true", "--model.init_args.gan.blocks=three"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", dmd, bad])
        assert bad.split("=")[0].rsplit(".", 1)[1] in capsys.readouterr().err


def test_gradient_accumulation_reproduces_the_larger_batch(tmp_path, teacher_file, prompt_file):
    """2 micro-batches of 2 == one batch of 4: the same rows, the same noise streams, the same updates."""
    big = distill(teacher_file)
    trainer(tmp_path / "a", 5).fit(big, datamodule=PromptDataModule(prompt_file, batch_size=4, batches_per_epoch=50))
    small = distill(teacher_file, scale={"accumulate_grad_batches": 2})
    t_small = trainer(tmp_path / "b", 5)
    t_small.fit(small, datamodule=PromptDataModule(prompt_file, batch_size=2, batches_per_epoch=50))
    assert small.batches_seen == 2 * big.batches_seen == 10
    assert (small.generator_steps, small.critic_steps) == (big.generator_steps, big.critic_steps)
    for (name, p), q in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)


class _GradsAfterBatch(L.Callback):
    """After each training batch: (micro-batch index of the next update, parameters holding a gradient)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer_, module, outputs, batch, batch_idx):
        self.seen.append((module._micro, [n for n, p in module.named_parameters() if p.grad is not None]))


@pytest.mark.parametrize("accumulate,objective", [(1, "dmd"), (2, "dmd"), (1, "sid")])
def test_no_gradients_are_held_between_updates(tmp_path, teacher_file, prompt_file, accumulate, objective):
    """With alternating generator/critic updates, a net's gradients held until its own next update would sit in
    memory through the other's (5.3 GiB of fp32 for a 1.3B net). SiD's generator loss has the critic on its graph:
    its parameters must not collect gradients there either."""
    module = distill(teacher_file, scale={"accumulate_grad_batches": accumulate}, distribution_loss=objective)
    check = _GradsAfterBatch()
    t = trainer(tmp_path, 4)
    t.callbacks.append(check)
    t.fit(module, datamodule=PromptDataModule(prompt_file, batch_size=2, batches_per_epoch=50))
    assert module.generator_steps > 0 and module.critic_steps > 0
    done = [held for micro, held in check.seen if micro == 0]  # batches that completed an update
    assert done and not any(done), [h[:3] for h in done if h]
    if accumulate > 1:  # between the micro-batches of one update the gradients do accumulate
        assert any(held for micro, held in check.seen if micro > 0)


def test_frame_timestep_prob_draws_per_frame_timesteps_for_that_fraction():
    from sfplus.noise import SampleNoise

    def draw(prob, n=64, frames=5):
        module = DiffusionModule(net="tiny", net_overrides=TINY, frame_timestep_prob=prob, train_shift=3.0)
        return module._training_timesteps(SampleNoise(range(n)), frames)

    assert draw(0.0).shape == (64,)
    t = draw(1.0)
    assert t.shape == (64, 5) and (t.std(dim=1) > 0).all()
    mixed = draw(0.5)
    varying = mixed.std(dim=1) > 0
    assert 0 < varying.sum() < 64  # some clips share one timestep, some draw per frame
    assert ((mixed > 0) & (mixed <= 1000)).all()
    assert torch.equal(draw(0.5), mixed)  # a function of the sample streams only
    with pytest.raises(ValueError, match="frame_timestep_prob"):
        DiffusionModule(net="tiny", net_overrides=TINY, frame_timestep_prob=1.5)
    with pytest.raises(ValueError, match="bidirectional"):
        DiffusionModule(net="tiny", net_overrides=TINY, frame_timestep_prob=0.5, causal={"frames_per_block": 1})


def test_reference_cfg_names_are_refused_with_the_wan_value():
    """One CFG convention (Wan's): a config written with the reference's names gets the value to write instead."""
    with pytest.raises(ValueError, match=r"set guidance_scale: 6\.0 for real_guidance_scale: 5\.0"):
        DistillModule(net="tiny", real_guidance_scale=5.0)
    with pytest.raises(ValueError, match=r"set critic_guidance_scale: 1\.0 for fake_guidance_scale: 0\.0"):
        DistillModule(net="tiny", fake_guidance_scale=0.0)
