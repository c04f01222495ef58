"""Every recipe YAML under configs/ parses through the CLI (keys and types checked by jsonargparse), the Wan
recipes carry the reference's hyper-parameters, and the toy twins of the Wan recipes run 2 steps on the tiny
preset (their files rewritten to tiny nets, a tiny teacher saved here and temporary output folders)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from sfplus.cli import main, read_config
from sfplus.datamodules.shard_format import Sample, write_shards
from sfplus.flow import warp_timesteps
from tests.helpers import write_tiny_teacher

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
WAN = ROOT / "configs" / "wan2.1"
TOY_TWINS = ["causal_ode", "causal_dmd", "sid", "causvid", "gan", "diffusion_causal"]
TINY = {"in_dim": 3, "out_dim": 3, "text_dim": 32, "text_len": 16}  # text sizes of the ToyConditioner defaults
SHAPE = [3, 4, 8, 8]


def load(path: Path) -> dict:
    """The config as a plain dict, `${...}` interpolations resolved (as the CLI resolves them)."""
    return read_config(path)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == load(config)["model"]["class_path"]


def test_every_wan_recipe_and_toy_twin_exists():
    names = {c.stem for c in WAN.glob("*.yaml")}
    assert {"t2v_14b_dmd", "i2v_14b_480p_dmd", "t2v_13b_ode_init", "t2v_13b_self_forcing_dmd",
            "t2v_13b_self_forcing_sid", "t2v_13b_causvid", "t2v_13b_diffusion", "t2v_14b_predict"} <= names
    assert all((ROOT / "configs" / "toy" / f"{n}.yaml").is_file() for n in TOY_TWINS)


def _callback(cfg: dict, name: str) -> dict:
    return next(c.get("init_args", {}) for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(name))


@pytest.mark.parametrize("name, guidance, iterations", [("t2v_14b_dmd", 5.0, 3000), ("i2v_14b_480p_dmd", 6.0, 1000)])
def test_14b_dmd_recipes_carry_the_reference_hyper_parameters(name, guidance, iterations):
    cfg = load(WAN / f"{name}.yaml")
    m = cfg["model"]["init_args"]
    assert (m.get("causal"), m["distribution_loss"]) == (None, "dmd")
    g, c = m["generator_optimizer"], m["critic_optimizer"]
    assert (g["lr"], c["lr"], g["weight_decay"], c["weight_decay"]) == (2e-6, 4e-7, 0.01, 0.01)
    same = "${model.init_args.generator_optimizer.%s}"  # written out or an interpolation of the generator's
    assert g["betas"] == [0.0, 0.999] and c["betas"] in (g["betas"], same % "betas")
    # Wan's CFG convention: the reference's real_guidance_scale + 1 (5 -> 6 for T2V, 6 -> 7 for I2V).
    assert (m["dfake_gen_update_ratio"], m["guidance_scale"], m["schedule"]["shift"]) == (5, guidance + 1, 5.0)
    assert (m["schedule"]["steps"], m["schedule"]["warp"]) == ([1000, 750, 500, 250], True)
    assert g["max_grad_norm"] == 10.0 and c["max_grad_norm"] in (10.0, same % "max_grad_norm")
    assert m["scale"] == {"activation_checkpointing": True, "param_dtype": "bf16", "frozen_dtype": "bf16"}
    assert m["video_shape"] == [16, 21, 60, 104] and cfg["data"]["init_args"]["batch_size"] == 1
    assert _callback(cfg, "EMA") == {"decay": 0.99, "start_iteration": 200}
    assert cfg["trainer"]["max_steps"] == iterations + iterations // 5  # critic + generator updates
    assert cfg["trainer"]["num_nodes"] * cfg["trainer"]["devices"] == 64
    assert cfg["trainer"]["logger"]["init_args"]["version"]  # fixed: requeued jobs log into one folder
    names = {c["class_path"].rsplit(".", 1)[1] for c in cfg["trainer"]["callbacks"]}
    assert names >= {"AtomicCheckpoint", "Preemption"}
    conditioner = m["conditioner"]["init_args"]
    assert conditioner.get("i2v", False) == (name.startswith("i2v"))
    assert conditioner.get("offload_text_encoder", False) == (name.startswith("i2v"))  # as the reference


def test_ode_init_recipe_matches_the_trajectory_schedule():
    m = load(WAN / "t2v_13b_ode_init.yaml")["model"]["init_args"]
    steps = warp_timesteps(m["schedule"]["steps"], m["schedule"]["shift"])
    assert steps == pytest.approx([1000, 960, 888.889, 727.273], abs=1e-3)  # generate_ode_pairs.py's defaults
    for recipe in ("t2v_13b_self_forcing_dmd", "t2v_13b_self_forcing_sid", "t2v_13b_causvid",
                   "t2v_13b_self_forcing_gan"):
        r = load(WAN / f"{recipe}.yaml")["model"]["init_args"]
        assert r["causal"]["frames_per_block"] == 3
        assert r["generator_checkpoint"].startswith("runs/t2v-13b-ode-init/")


def test_gan_recipes_build_the_references_head():
    """The reference's discriminator head (docs/reference_equivalence.md, 'Fixed — GAN head layout'): FFN 8192, a
    learnable register-token RMSNorm weight, norm2 without affine; blocks (13, 21, 29) of the 1.3B critic, one token
    each."""
    for path in (WAN / "t2v_13b_self_forcing_gan.yaml", ROOT / "configs" / "toy" / "gan.yaml"):
        gan = load(path)["model"]["init_args"]["gan"]
        assert (gan["ffn_dim"], gan["register_norm_weight"], gan["norm2_affine"]) == (8192, True, False), path
        assert (gan["tokens_per_block"], gan["g_weight"], gan["d_weight"]) == (1, 0.01, 0.01)
    assert load(WAN / "t2v_13b_self_forcing_gan.yaml")["model"]["init_args"]["gan"]["blocks"] == [13, 21, 29]


# ---------------------------------------------------------------------------------------------------- toy twins


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    return write_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors", TINY)


def tiny_ode_shards(out: Path) -> str:
    steps = torch.tensor([*warp_timesteps([1000, 750, 500, 250], 8.0), 0.0])
    samples = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        x0, eps = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
        sigma = (steps / 1000).view(-1, 1, 1, 1, 1)
        samples.append(Sample(key=f"s{i}", prompt="a red square moving left", ode=(1 - sigma) * x0 + sigma * eps,
                              ode_timesteps=steps))
    write_shards(samples, out, [2], dtype=torch.float32)
    return str(out)


def tiny_twin(name: str, tmp_path: Path, teacher: str) -> Path:
    """The toy twin with tiny nets, the tiny teacher, 2 steps and every output under tmp_path."""
    cfg = copy.deepcopy(load(ROOT / "configs" / "toy" / f"{name}.yaml"))
    trainer = cfg["trainer"]
    trainer.update(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
    for cb in trainer["callbacks"]:
        args = cb.setdefault("init_args", {})
        for key in ("dirpath", "output_dir"):
            if key in args:
                args[key] = str(tmp_path / key)
    m = cfg["model"]["init_args"]
    m.update(net="tiny", net_overrides=TINY, video_shape=SHAPE)
    for key in ("teacher_checkpoint", "generator_checkpoint", "critic_checkpoint", "init_checkpoint"):
        if key in m:
            m[key] = teacher
    if "gan" in m:
        m["gan"]["blocks"] = [0, -1]  # the tiny preset has 2 blocks
    data = cfg["data"]["init_args"]
    if cfg["data"]["class_path"].endswith("LatentShardDataModule"):
        data.update(path=tiny_ode_shards(tmp_path / "ode"), batch_size=2)
    else:
        data.update(height=8, width=8, size=3, batch_size=2, length=8)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", TOY_TWINS)
def test_toy_twin_runs_two_steps(name, tmp_path, tiny_teacher):
    torch.set_num_threads(1)
    main(["fit", "--config", str(tiny_twin(name, tmp_path, tiny_teacher))])
    ckpt = torch.load(tmp_path / "dirpath" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    counters = ckpt["sfplus"]["counters"]
    assert counters["batches_seen"] == 2
    if "generator_steps" in counters:  # distillation: generator at iteration 0, then a critic update
        assert (counters["generator_steps"], counters["critic_steps"]) == (1, 1)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_config_states_its_precision(config):
    """No silent fp32: every recipe says what it computes in; the real-model ones bf16 as the reference does."""
    precision = load(config)["trainer"].get("precision")
    assert precision is not None, f"{config.name}: set trainer.precision"
    if config.parent == WAN:
        assert precision == "bf16-mixed", f"{config.name}: the Wan recipes train and generate in bf16"
        assert load(config)["model"]["init_args"]["scale"]["param_dtype"] == "bf16"
