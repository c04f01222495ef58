"""`sfplus export`: Lightning checkpoints (file and torch.distributed.checkpoint directory) and Self-Forcing files
exported to Wan-original / diffusers safetensors; read back and compared tensor by tensor (tiny preset, CPU)."""

import importlib.util
import json

import pytest
import torch

from sfplus.nets.presets import build_dit
from sfplus.weights.checkpoints import CheckpointError, read_dit_state_dict
from sfplus.weights.diffusers_keys import wan_to_diffusers
from sfplus.weights.export import export_generator, main
from sfplus.weights.wan_folders import detect_preset, read_folder_state_dict

W = "diffusion_pytorch_model"


def _random_sd(seed, name="tiny"):
    torch.manual_seed(seed)
    model = build_dit(name)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights():
    return {"ema": _random_sd(0), "model": _random_sd(1), "critic": _random_sd(2)}


@pytest.fixture
def lightning_ckpt(tmp_path, weights):
    """What an sfplus DistillModule's Lightning checkpoint looks like (frozen teacher already removed)."""
    sd = {}
    for prefix, name in (("generator_ema.", "ema"), ("generator.", "model"), ("critic.", "critic")):
        sd.update({prefix + k: v for k, v in weights[name].items()})
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "epoch": 0, "global_step": 7,
                "sfplus": {"net": "tiny", "net_overrides": {}, "class": "DistillModule"}}, path)
    return path


def _same(a, b, dtype=None):
    assert sorted(a) == sorted(b)
    for k, v in b.items():
        v = v if dtype is None else v.to(dtype)
        assert a[k].dtype == v.dtype and torch.equal(a[k], v), k


def test_wan_layout_folder_file_and_which(tmp_path, lightning_ckpt, weights):
    out = export_generator(str(lightning_ckpt), str(tmp_path / "ema"), dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", f"{W}.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and cfg["dim"] == 32 and cfg["model_type"] == "t2v"
    _same(read_folder_state_dict(out), weights["ema"])
    assert detect_preset(out) == "tiny"

    raw = export_generator(str(lightning_ckpt), str(tmp_path / "raw"), which="model", dtype="fp16")
    _same(read_folder_state_dict(raw), weights["model"], torch.float16)

    single = export_generator(str(lightning_ckpt), str(tmp_path / "gen.safetensors"))  # bf16 by default
    _same(read_dit_state_dict(single), weights["ema"], torch.bfloat16)
    # loads strictly into the architecture (what lightx2v / ComfyUI do with Wan names)
    build_dit("tiny").load_state_dict(read_dit_state_dict(single), strict=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_sharded_output_and_overwrite(tmp_path, lightning_ckpt, weights):
    out = tmp_path / "sharded"
    export_generator(str(lightning_ckpt), str(out), dtype="fp32", shard_size_gb=20e-6)  # 20 kB shards
    shards = sorted(out.glob(f"{W}-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / f"{W}.safetensors").exists()
    index = json.loads((out / f"{W}.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in weights["ema"].values())
    _same(read_folder_state_dict(out), weights["ema"])

    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        export_generator(str(lightning_ckpt), str(out))
    export_generator(str(lightning_ckpt), str(out), which="model", dtype="fp32", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", f"{W}.safetensors"]  # old shards gone
    _same(read_folder_state_dict(out), weights["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "sharded"]


@torch.no_grad()
def test_diffusers_layout_loads_in_diffusers_and_round_trips(tmp_path, lightning_ckpt, weights):
    out = export_generator(str(lightning_ckpt), str(tmp_path / "transformer"), layout="diffusers", dtype="fp32")
    from safetensors.torch import load_file

    stored = load_file(str(out / f"{W}.safetensors"))
    _same(stored, wan_to_diffusers(weights["ema"]))
    # wan -> diffusers -> wan: identical keys and values
    _same(read_folder_state_dict(out), weights["ema"])
    back = export_generator(str(out), str(tmp_path / "wan-again"), dtype="fp32")
    _same(read_folder_state_dict(back), weights["ema"])

    diffusers = pytest.importorskip("diffusers")
    cls = diffusers.WanTransformer3DModel
    if importlib.util.find_spec("accelerate") is not None:
        theirs = cls.from_pretrained(str(out)).eval()
    else:  # from_pretrained needs accelerate for this class (fp32-kept modules); same config + strict load
        theirs = cls.from_config(cls.load_config(str(out))).eval()
        theirs.load_state_dict(stored, strict=True)
    assert theirs.config.num_layers == 2 and theirs.config.attention_head_dim == 16
    ours = build_dit("tiny").eval()
    ours.load_state_dict(weights["ema"], strict=True)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 8, 16, generator=g)  # 8 = tiny text_len
    t = torch.tensor([125.0, 900.0])
    ref = theirs(x, t, context, return_dict=False)[0]
    scale = ref.abs().max().item()
    assert scale > 1.0
    # N(0, 1) weights give outputs ~1e3; diffusers computes the timestep sinusoid in float32 (ours in float64 like
    # official Wan), which moves outputs by ~1e-5 of their scale. A wrong key map moves them by O(scale).
    torch.testing.assert_close(ours(x, t, context), ref, atol=1e-4 * scale, rtol=0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("container", ["state_dict", "model"])  # ModelParallelStrategy / FSDPStrategy layouts
def test_distributed_checkpoint_directory(tmp_path, weights, container, monkeypatch):
    """A sharded Lightning checkpoint directory: only the chosen generator's tensors are read."""
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "step-7.ckpt"
    state = {
        container: {**{"generator_ema." + k: v for k, v in weights["ema"].items()},
                    **{"generator._orig_mod." + k: v for k, v in weights["model"].items()},
                    **{"critic." + k: v for k, v in weights["critic"].items()}},
        "optimizer_0": {"state": {"0": {"exp_avg": torch.ones(3)}}},
    }
    dcp.save(state, checkpoint_id=str(ckpt), no_dist=True)
    torch.save({"global_step": 7, "sfplus": {"net": "tiny", "net_overrides": {}}}, ckpt / "meta.pt")

    requested = []
    real_load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda sd, **kw: (requested.append(sorted(sd)), real_load(sd, **kw))[1])
    _same(read_folder_state_dict(export_generator(str(ckpt), str(tmp_path / "e"), dtype="fp32")), weights["ema"])
    assert requested == [sorted(f"{container}.generator_ema.{k}" for k in weights["ema"])]
    out = export_generator(str(ckpt), str(tmp_path / "m"), which="model", dtype="fp32")
    _same(read_folder_state_dict(out), weights["model"])


def test_self_forcing_source_without_info_detects_preset(tmp_path, weights):
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in weights["ema"].items()}}, path)
    out = export_generator(str(path), str(tmp_path / "sf"), dtype="fp32")
    _same(read_folder_state_dict(out), weights["ema"])


def test_mismatch_and_argument_errors(tmp_path, lightning_ckpt):
    with pytest.raises(CheckpointError, match=r"missing: blocks\.0\.cross_attn\.k_img\.bias.*\n.*patch_embedding"):
        export_generator(str(lightning_ckpt), str(tmp_path / "x"), preset="tiny-i2v")
    with pytest.raises(ValueError, match="only layout='wan' without shard_size_gb"):
        export_generator(str(lightning_ckpt), str(tmp_path / "x.safetensors"), layout="diffusers")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_generator(str(tmp_path / "nope.ckpt"), str(tmp_path / "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_main_cli(tmp_path, lightning_ckpt, weights, capsys):
    out = tmp_path / "cli"
    main(["--ckpt_path", str(lightning_ckpt), "--out", str(out), "--dtype", "fp32", "--which", "model"])
    assert "exported" in capsys.readouterr().out
    _same(read_folder_state_dict(out), weights["model"])
    with pytest.raises(SystemExit):
        main(["--ckpt_path", str(lightning_ckpt), "--out", str(out), "--dtype", "int8"])
