"""Every shipped Wan recipe (``configs/wan2.1/*.yaml``), as shipped, through the real ``sfplus`` CLI.

Only what a CPU test must change is overridden (:func:`cpu_twin`):

* net size: the ``tiny`` / ``tiny-i2v`` presets, sized to a tiny Wan folder of the real encoder classes
  (tests.helpers.write_tiny_wan_folder), a tiny ``video_shape`` (and the I2V pixel length that matches it), GAN
  register blocks that exist in a 2-block net;
* paths: weights, data, logs, checkpoints and videos under the test's folder;
* the accelerator: CPU, and 2 gloo ranks through ``torch.distributed.run`` for the sharded ones. Training configs get
  the strategy ``tools/slurm/fit.sbatch`` appends (read from the script itself), with the world size 2.

Everything else — ``scale`` (bf16 FSDP2, activation checkpointing, bf16 teacher), ``trainer.precision``,
optimizers, schedules, callbacks, data modules — stays as shipped. What cannot run on a CPU: the
``SLURMEnvironment`` plugin of the fit template (it reads SLURM's variables; a CPU test has no SLURM job), so the
ranks take ``torch.distributed.run``'s environment instead, which is what Lightning uses on any other launcher.

Training configs run 3 updates, stop, resume from ``last.ckpt`` and finish at 5; the causal recipes start from the
sharded checkpoint the ODE-initialisation recipe wrote (as their ``generator_checkpoint`` says). Predict configs
write an uneven number of videos (3 prompts on 2 ranks: one rank's last batch is padding), lose two of them (an
interrupted job), and are run again: only the missing ones are written, nothing twice, and no rank hangs.
A config added to ``configs/wan2.1`` is picked up here automatically; one this file does not know fails.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sfplus.cli import read_config
from sfplus.nets.presets import build_dit
from tests.helpers import TINY_VAE, TINY_WAN_IMAGE, TINY_WAN_TEXT, write_tiny_wan_folder

ROOT = Path(__file__).resolve().parent.parent
WAN = ROOT / "configs" / "wan2.1"
CONFIGS = sorted(WAN.glob("*.yaml"))
FIT_TEMPLATE = ROOT / "tools" / "slurm" / "fit.sbatch"
RANKS = 2
BIDIRECTIONAL_SHAPE = [16, 2, 2, 2]  # 16 latent channels (the VAE's), 2 latent frames, one 2x2 patch per frame
CAUSAL_SHAPE = [16, 6, 2, 2]  # two causal blocks of 3 frames (the recipes' frames_per_block)
TRAIN_STEPS, RESUME_STEPS = 3, 5

pytest.importorskip("transformers")  # the tiny Wan folder's UMT5 and CLIP
pytest.importorskip("sentencepiece")  # its tokenizer
pytestmark = pytest.mark.slow


def load(path: Path) -> dict:
    return read_config(path)


def is_predict(cfg: dict) -> bool:
    """Predict configs have no optimisation schedule (no ``max_steps``)."""
    return "max_steps" not in cfg["trainer"]


def fit_template_overrides(world: int) -> dict:
    """The YAML that tools/slurm/fit.sbatch writes for every training job, with ``$WORLD`` = ``world``."""
    text = FIT_TEMPLATE.read_text(encoding="utf-8")
    block = re.search(r"<<YAML\n(.*?)\nYAML\n", text, re.S)
    assert block, f"{FIT_TEMPLATE} no longer writes its overrides as a <<YAML here-document"
    return yaml.safe_load(block.group(1).replace("$WORLD", str(world)))


# ------------------------------------------------------------------------------------------------ inputs


def _tiny_dit_file(path: Path, preset: str, overrides: dict) -> str:
    torch.manual_seed(0)
    net = build_dit(preset, **overrides)
    net.init_weights()
    torch.nn.init.normal_(net.head.head.weight, std=0.02)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".pt":  # Self-Forcing's training-file layout: {"generator", "generator_ema"} with "model."
        torch.save({name: {f"model.{k}": v for k, v in sd.items()} for name in ("generator", "generator_ema")}, path)
    else:
        save_file(sd, str(path))
    return str(path)


def _shards(out: Path, shape: list[int], cfg: dict) -> str:
    """Latent shards with what every recipe may read (latents, first frames, the recipe's ODE trajectory): the
    ones tools/fit_shipped.py writes for a GPU check."""
    return fit_shipped_tool().random_shards(out, shape, cfg["model"]["init_args"])


def fit_shipped_tool():
    spec = importlib.util.spec_from_file_location("fit_shipped", ROOT / "tools" / "fit_shipped.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image_folder(out: Path, n: int, size: int) -> str:
    from PIL import Image

    out.mkdir(parents=True)
    for i in range(n):
        rgb = (torch.rand(size, size, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
        Image.fromarray(rgb).save(out / f"{i}.png")
        (out / f"{i}.txt").write_text(f"a cat number {i}")
    return str(out)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    return write_tiny_wan_folder(tmp_path_factory.mktemp("Wan2.1-tiny"))


@pytest.fixture(scope="module")
def ode_init_checkpoint(tmp_path_factory, wan_folder) -> str:
    """The sharded last.ckpt of the shipped ODE-initialisation recipe: the causal recipes' generator_checkpoint."""
    tmp = tmp_path_factory.mktemp("ode-init")
    run_fit(WAN / "t2v_13b_ode_init.yaml", tmp, wan_folder, None)
    return str(tmp / "run" / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------------------------------------------ the CPU twin


def cpu_twin(path: Path, tmp: Path, wan: Path, generator_checkpoint: str | None) -> tuple[dict, int]:
    """The shipped config with only net size, paths and accelerator changed; returns (config, ranks)."""
    shipped = load(path)
    cfg = copy.deepcopy(shipped)
    trainer, m = cfg["trainer"], cfg["model"]["init_args"]
    predict = is_predict(shipped)
    sharded = not predict or "strategy" in shipped["trainer"]
    ranks = RANKS if sharded else 1

    # Accelerator and ranks.
    trainer.update(accelerator="cpu", num_nodes=1, devices=ranks, default_root_dir=str(tmp / "run"))
    if predict and sharded:
        trainer["strategy"]["init_args"]["data_parallel_size"] = ranks
    elif not predict:
        template = fit_template_overrides(ranks)["trainer"]
        assert [p["class_path"].rsplit(".", 1)[1] for p in template.pop("plugins")] == ["SLURMEnvironment"]
        template.pop("accelerator")
        # The config's own strategy is the template's, sized for 8 x 8 GPUs; the template sizes it to the job.
        assert shipped["trainer"]["strategy"]["class_path"] == template["strategy"]["class_path"], path.name
        trainer.update(template)

    # Paths.
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"]["save_dir"] = str(tmp / "tb")
    for cb in trainer.get("callbacks", []):
        args = cb.get("init_args") or {}
        if "output_dir" in args:
            args["output_dir"] = str(tmp / "videos")
        if "dirpath" in args:
            args["dirpath"] = str(tmp / "run" / "checkpoints")

    # Net size: tiny presets matched to the tiny Wan folder's encoders.
    i2v = m["conditioner"]["init_args"].get("i2v", False)
    preset = "tiny-i2v" if i2v else "tiny"
    overrides = {**TINY_WAN_TEXT, **(TINY_WAN_IMAGE if i2v else {})}
    causal = m.get("causal") is not None
    shape = CAUSAL_SHAPE if causal else BIDIRECTIONAL_SHAPE
    m.update(net=preset, net_overrides=overrides, video_shape=shape)
    if "teacher_net" in m:  # a larger teacher (14B for the 1.3B Self-Forcing student): tiny as well
        m.update(teacher_net=preset, teacher_net_overrides=overrides)
    if "gan" in m:
        m["gan"]["blocks"] = [0, 1]
    cond = m["conditioner"]["init_args"]
    cond.update(model_dir=str(wan), vae_config=TINY_VAE, clip_num_heads=2)
    if "num_pixel_frames" in cond:
        cond["num_pixel_frames"] = 1 + 4 * (shape[1] - 1)
    for key in ("teacher_checkpoint", "critic_checkpoint", "init_checkpoint", "generator_checkpoint"):
        if key in m:
            suffix = Path(m[key]).suffix if Path(m[key]).suffix == ".pt" else ".safetensors"
            m[key] = _tiny_dit_file(tmp / f"{key}{suffix}", preset, overrides)
    if generator_checkpoint and "generator_checkpoint" in shipped["model"]["init_args"]:
        m["generator_checkpoint"] = generator_checkpoint

    # Data.
    data = cfg["data"]["init_args"]
    kind = cfg["data"]["class_path"].rsplit(".", 1)[1]
    if kind == "PromptDataModule":
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join(f"a cat number {i} sits on a mat" for i in range(3 if predict else 4)))
        data["path"] = str(prompts)
    elif kind == "LatentShardDataModule":
        data["path"] = _shards(tmp / "shards", shape, cfg)
    elif kind == "ImagePromptDataModule":
        data["path"] = _image_folder(tmp / "images", 3, 8 * shape[2])
        data["max_area"] = (8 * shape[2]) * (8 * shape[3])
    else:
        raise AssertionError(f"{path.name}: data module {kind} is new to this test: add its paths to cpu_twin")
    return cfg, ranks


def launch(cfg: dict, ranks: int, tmp: Path, command: str, *extra: str) -> None:
    config = tmp / f"{command}-{len(list(tmp.glob('*.yaml')))}.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    cli = ["-m", "sfplus.cli", command, "--config", str(config), *extra]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *cli]
    else:
        cmd = [sys.executable, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"


def run_fit(path: Path, tmp: Path, wan: Path, generator_checkpoint: str | None) -> dict:
    """Train TRAIN_STEPS updates, stop, resume from last.ckpt and finish at RESUME_STEPS; return the meta of
    the final checkpoint."""
    cfg, ranks = cpu_twin(path, tmp, wan, generator_checkpoint)
    cfg["trainer"]["max_steps"] = TRAIN_STEPS
    launch(cfg, ranks, tmp, "fit")
    last = tmp / "run" / "checkpoints" / "last.ckpt"
    assert last.exists(), f"{path.name}: no last.ckpt after {TRAIN_STEPS} updates"
    cfg["trainer"]["max_steps"] = RESUME_STEPS
    launch(cfg, ranks, tmp, "fit", "--ckpt_path", str(last))
    return checkpoint_meta(last)


def checkpoint_meta(path: Path) -> dict:
    target = path / "meta.pt" if path.is_dir() else path
    return torch.load(target, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------ tests


def test_every_shipped_wan_config_is_covered():
    known = {"i2v_14b_480p_dmd", "i2v_14b_480p_predict", "t2v_13b_causvid", "t2v_13b_diffusion", "t2v_13b_ode_init",
             "t2v_13b_self_forcing_dmd", "t2v_13b_self_forcing_gan", "t2v_13b_self_forcing_predict",
             "t2v_13b_self_forcing_sid", "t2v_14b_dmd", "t2v_14b_predict"}
    assert {c.stem for c in CONFIGS} >= known  # new files are run by the parametrised tests below


TRAINING = [c for c in CONFIGS if not is_predict(load(c)) and c.stem != "t2v_13b_ode_init"]
PREDICT = [c for c in CONFIGS if is_predict(load(c))]


def test_ode_init_trains_stops_resumes_and_shards(ode_init_checkpoint):
    last = Path(ode_init_checkpoint)
    assert last.is_dir(), "ModelParallelStrategy writes a sharded checkpoint directory"
    meta = checkpoint_meta(last)
    assert meta["global_step"] == RESUME_STEPS and meta["sfplus"]["counters"]["batches_seen"] == RESUME_STEPS


@pytest.mark.parametrize("path", TRAINING, ids=[c.stem for c in TRAINING])
def test_training_config_as_shipped(path, tmp_path, wan_folder, ode_init_checkpoint):
    meta = run_fit(path, tmp_path, wan_folder, ode_init_checkpoint)
    assert meta["global_step"] == RESUME_STEPS
    counters = meta["sfplus"]["counters"]
    assert counters["batches_seen"] == RESUME_STEPS
    if "generator_steps" in counters:  # distillation: the ratio-5 schedule G C C C C
        assert (counters["generator_steps"], counters["critic_steps"]) == (1, RESUME_STEPS - 1)


@pytest.mark.parametrize("path", PREDICT, ids=[c.stem for c in PREDICT])
def test_predict_config_as_shipped(path, tmp_path, wan_folder):
    cfg, ranks = cpu_twin(path, tmp_path, wan_folder, None)
    launch(cfg, ranks, tmp_path, "predict")
    videos = tmp_path / "videos"
    written = sorted(videos.glob("*.mp4"))
    assert len(written) == 3, f"{path.name}: {[p.name for p in written]}"
    assert len(list(videos.glob("*.json"))) == 3
    # An interrupted job: two videos are missing (one per rank's share), the others must not be rewritten.
    lost = written[:2]
    for mp4 in lost:
        mp4.unlink()
        mp4.with_suffix(".json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in written[2:]}
    launch(cfg, ranks, tmp_path, "predict")
    again = sorted(videos.glob("*.mp4"))
    assert [p.name for p in again] == [p.name for p in written]
    assert {p.name: p.stat().st_mtime_ns for p in again if p.name in kept} == kept
