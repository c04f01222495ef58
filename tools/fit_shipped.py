"""Run a shipped recipe as written, on this machine, with random weights of the real sizes: the smoke test and the
time / memory check of a config before a cluster is spent on it.

    python tools/fit_shipped.py configs/wan2.1/t2v_14b_dmd.yaml --updates 6 --work /tmp/shipped
    python tools/fit_shipped.py configs/wan2.1/t2v_13b_self_forcing_dmd.yaml --set model.init_args.teacher_net=null
    python tools/fit_shipped.py configs/wan2.1/t2v_14b_dmd.yaml --set model.init_args.net=wan2.1-t2v-1.3b \\
        -- --trainer.log_every_n_steps 1              # anything after -- goes to `sfplus fit` unchanged

``--set KEY=VALUE`` (dotted path, YAML value) changes the config before the random files are made for it, e.g. the
1.3B teacher the Self-Forcing config's header offers instead of the 14B one.

What it writes under ``--work`` and points the config at (nothing else changes: ``scale``, precision, optimizers,
schedule, callbacks and data module stay as shipped):

* random DiT weights for every ``*_checkpoint`` key, of the preset that key's net uses (bf16 safetensors, like the
  published files; a checkpoint of another run, e.g. the ODE initialisation's, is replaced by such a file);
* a Wan model folder for the conditioner: UMT5-XXL encoder in Wan's key layout, a small SentencePiece tokenizer
  (the real one cannot be downloaded here; token ids only index the embedding), the Wan2.1 VAE, and CLIP ViT-H/14 for
  I2V — all random, all of the published sizes, so the encoders' memory is what a user's run holds;
* prompts, or latent shards at the config's ``video_shape`` for the recipes that read shards;
* logs, checkpoints and videos.

The run uses one device (``devices: 1``, ``num_nodes: 1``, the strategy's ``data_parallel_size: 1``): on one device
nothing is sharded and ``trainer.precision`` gives bf16 compute.
Prints one JSON row: seconds and peak memory (CUDA) per update kind (the first update, which pays for warm-up,
is reported apart). ``--tiny`` swaps the nets, encoders and video for tiny ones of the same classes (a CPU smoke run;
tests/tools runs it).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from safetensors.torch import save_file

from sfplus.cli import SfplusCLI, read_config
from sfplus.conditioning.wan import CLIP_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE
from sfplus.datamodules.shard_format import Sample, write_shards
from sfplus.flow import warp_timesteps
from sfplus.nets.image import clip_vit_h14_config, hf_clip_to_wan
from sfplus.nets.presets import build_dit
from sfplus.nets.text import hf_t5_to_wan, umt5_xxl_config
from sfplus.nets.vae import WanVAE

KEYS = ("teacher_checkpoint", "generator_checkpoint", "critic_checkpoint", "init_checkpoint")
TINY_DIT = {"text_dim": 32, "text_len": 512}
TINY_VAE = dict(dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temporal_downsample=[False, True, True])
TINY_SHAPE = {"bidirectional": [16, 2, 2, 2], "causal": [16, 6, 2, 2]}


class UpdateTimer(L.Callback):
    """Wall time and peak device memory of every optimizer update, by kind (``module.last_update``)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        self.rows.append({"update": getattr(module, "last_update", None) or "update",
                          "seconds": round(time.perf_counter() - self._start, 3),
                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None})

    def summary(self) -> dict:
        out: dict = {"first": self.rows[0] if self.rows else None, "updates": len(self.rows)}
        for row in self.rows[1:]:
            kind = out.setdefault(row["update"], {"seconds": [], "peak_gib": []})
            kind["seconds"].append(row["seconds"])
            kind["peak_gib"].append(row["peak_gib"])
        return out


# ------------------------------------------------------------------------------------------------ random files


def _random_dit(path: Path, preset: str, overrides: dict, device: torch.device) -> str:
    if not path.exists():
        with torch.device(device):
            net = build_dit(preset, **overrides)
        net.init_weights()
        torch.nn.init.normal_(net.head.head.weight, std=0.02)  # init_weights zeroes the head
        save_file({k: v.to(torch.bfloat16).contiguous().cpu() for k, v in net.state_dict().items()}, str(path))
        del net
    return str(path)


def _tokenizer(folder: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    words = ["a cat walks on the grass", "realistic style", "the sun sets slowly", "two dogs run in the park"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words * 8), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))


def _random_wan_folder(folder: Path, i2v: bool, tiny: bool, device: torch.device) -> Path:
    """T5 (+ tokenizer), VAE and, for I2V, CLIP in Wan's published file names and key layouts, random weights."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / T5_FILE).exists():
        cfg = umt5_xxl_config()
        if tiny:
            cfg = transformers.UMT5Config(**{**cfg.to_dict(), "vocab_size": 64, "d_model": 32, "d_kv": 16,
                                             "d_ff": 64, "num_layers": 2, "num_heads": 2})
        with torch.device(device):
            t5 = transformers.UMT5EncoderModel(cfg).to(torch.bfloat16)
        torch.save({k: v.cpu() for k, v in hf_t5_to_wan(t5.state_dict()).items()}, folder / T5_FILE)
        del t5
        _tokenizer(folder / TOKENIZER_DIR)
    if not (folder / VAE_FILE).exists():
        torch.save(WanVAE(**(TINY_VAE if tiny else {})).state_dict(), folder / VAE_FILE)
    if i2v and not (folder / CLIP_FILE).exists():
        cfg = clip_vit_h14_config()
        if tiny:
            cfg = transformers.CLIPVisionConfig(**{**cfg.to_dict(), "hidden_size": 32, "intermediate_size": 64,
                                                   "num_hidden_layers": 3, "num_attention_heads": 2,
                                                   "image_size": 28, "projection_dim": 16})
        with torch.device(device):
            clip = transformers.CLIPVisionModel(cfg).to(torch.float16)
        torch.save({k: v.cpu() for k, v in hf_clip_to_wan(clip.state_dict()).items()}, folder / CLIP_FILE)
        del clip
    return folder


def random_shards(out: Path, shape: list[int], m: dict) -> str:
    """4 random samples in 2 latent shards with every field a recipe may read: ``latent`` ``shape``, a first frame
    of the matching pixel size, and an ODE trajectory on the recipe ``m``'s warped schedule (plus the clean end)."""
    if (out / "index.json").exists():
        return str(out)
    schedule = m.get("schedule") or {}
    steps = torch.tensor([*warp_timesteps(schedule.get("steps", [1000, 750, 500, 250]), schedule.get("shift", 8.0)),
                          0.0])
    sigma = (steps / 1000).view(-1, 1, 1, 1, 1)
    samples = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        frame = (torch.rand(3, 8 * shape[2], 8 * shape[3], generator=g) * 255).to(torch.uint8)
        samples.append(Sample(key=f"s{i}", prompt=f"A cat walks on the grass, realistic style, take {i}.",
                              latent=x0, first_frame=frame, ode=(1 - sigma) * x0 + sigma * eps, ode_timesteps=steps))
    write_shards(samples, out, [2, 2], dtype=torch.float32)
    return str(out)


# ------------------------------------------------------------------------------------------------ the config


def random_weights_config(
    shipped: dict, work: Path, *, tiny: bool, device: torch.device, files: Path | None = None
) -> dict:
    """The shipped config with its paths pointed at random files under ``files`` (default ``work/files``; made once,
    reused by later runs) and its outputs under ``work`` (see the module docstring)."""
    files = files or work / "files"
    cfg = copy.deepcopy(shipped)
    trainer, m = cfg["trainer"], cfg["model"]["init_args"]
    trainer.update(num_nodes=1, devices=1, default_root_dir=str(work / "run"))
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and "data_parallel_size" in strategy.get("init_args", {}):
        strategy["init_args"]["data_parallel_size"] = 1  # the recipe's sharding, over the one device here
    if tiny:
        trainer["accelerator"] = "cpu"
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"]["save_dir"] = str(work / "tb")
    for cb in trainer.get("callbacks", []):
        args = cb.get("init_args") or {}
        for key in ("output_dir", "dirpath"):
            if key in args:
                args[key] = str(work / key)
    i2v = m["conditioner"]["init_args"].get("i2v", False)
    causal = m.get("causal") is not None
    if tiny:
        preset = "tiny-i2v" if i2v else "tiny"
        overrides = {**TINY_DIT, **({"image_dim": 32} if i2v else {})}
        m.update(net=preset, net_overrides=overrides, video_shape=TINY_SHAPE["causal" if causal else "bidirectional"])
        if "teacher_net" in m:
            m.update(teacher_net=preset, teacher_net_overrides=overrides)
        if "gan" in m:
            m["gan"]["blocks"] = [0, 1]
    weights = files / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for key in KEYS:
        if key in m:
            preset = m.get("teacher_net") if key == "teacher_checkpoint" and m.get("teacher_net") else m["net"]
            extra = m.get("teacher_net_overrides") if preset == m.get("teacher_net") else m.get("net_overrides")
            m[key] = _random_dit(weights / f"{preset}.safetensors", preset, dict(extra or {}), device)
    cond = m["conditioner"]["init_args"]
    cond["model_dir"] = str(_random_wan_folder(files / ("wan-tiny" if tiny else "wan"), i2v, tiny, device))
    if tiny:
        cond.update(vae_config=TINY_VAE, clip_num_heads=2)
        if "num_pixel_frames" in cond:
            cond["num_pixel_frames"] = 1 + 4 * (m["video_shape"][1] - 1)
    data, kind = cfg["data"]["init_args"], cfg["data"]["class_path"].rsplit(".", 1)[1]
    if kind == "PromptDataModule":
        prompts = work / "prompts.txt"
        prompts.write_text("\n".join(f"A cat walks on the grass, realistic style, take {i}." for i in range(8)))
        data["path"] = str(prompts)
    elif kind == "LatentShardDataModule":
        data["path"] = random_shards(work / "shards", m["video_shape"], m)
    else:
        raise SystemExit(f"fit_shipped: data module {kind} is not supported (training configs only)")
    trainer.setdefault("callbacks", []).append({"class_path": f"{__name__}.UpdateTimer"})  # this script's module
    return cfg


def set_value(cfg: dict, item: str) -> None:
    """Apply ``a.b.c=VALUE`` (VALUE parsed as YAML) to the nested dict ``cfg``."""
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"fit_shipped: --set wants KEY=VALUE, got {item!r}")
    *parents, leaf = key.split(".")
    node = cfg
    for name in parents:
        if not isinstance(node.get(name), dict):
            raise SystemExit(f"fit_shipped: --set {key}: {name!r} is not a section of the config")
        node = node[name]
    parsed = yaml.safe_load(value)
    if parsed is None:
        node.pop(leaf, None)  # null: back to the default
    else:
        node[leaf] = parsed


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--updates", type=int, default=6, help="optimizer updates to run (trainer.max_steps)")
    parser.add_argument("--work", type=Path, default=Path("runs/fit-shipped"))
    parser.add_argument("--files", type=Path, default=None, help="where the random weight files go (default "
                        "WORK/files); reused when present, so several runs can share them")
    parser.add_argument("--tiny", action="store_true", help="tiny nets, encoders and video on the CPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a config value before the files are made (dotted key, YAML value)")
    args = parser.parse_args(argv)

    shipped = read_config(args.config)
    for item in args.set:
        set_value(shipped, item)
    if "max_steps" not in shipped.get("trainer", {}):
        raise SystemExit(f"fit_shipped: {args.config} is not a training config (no trainer.max_steps)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    start = time.perf_counter()
    cfg = random_weights_config(shipped, args.work, tiny=args.tiny, device=device, files=args.files)
    cfg["trainer"]["max_steps"] = args.updates
    prepared = round(time.perf_counter() - start, 1)
    path = args.work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")

    cli = SfplusCLI(args=["fit", "--config", str(path), *extra])
    timer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, UpdateTimer))
    row = {"name": f"fit_shipped:{args.config.stem}", "device": torch.cuda.get_device_name() if device.type == "cuda"
           else "cpu", "precision": str(cli.trainer.precision), "extra_args": extra, "files_seconds": prepared,
           **timer.summary()}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
