"""tools/: video -> latents (tiny Wan VAE) -> shards -> batches; LMDB import in the reference's layout; ODE pairs.

Everything is tiny: 2 videos of 9 frames, a WanVAE of base dim 4, a 2-layer DiT, LMDBs of 3 rows.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sfplus.datamodules.shard_format import read_sample_file
from sfplus.datamodules.shards import LatentShardDataModule, LatentShardDataset
from sfplus.nets.vae import WanVAE
from sfplus.video_io import write_mp4

TOOLS = Path(__file__).resolve().parents[2] / "tools"
TINY_VAE = dict(dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temporal_downsample=[False, True, True])


def tool(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["encode_latents", "make_shards", "import_lmdb", "generate_ode_pairs"])
def test_every_tool_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        tool(name).main(["--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- videos
def _gradient_video(frames: int, h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients (survive H.264 well), uint8 [T, H, W, 3]."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for t in range(frames):
        r = 128 + 100 * np.sin((xx + 3 * t) / 9.0 + g.uniform())
        gg = 128 + 100 * np.cos((yy - 2 * t) / 7.0)
        b = np.full_like(r, 60 + 10 * t)
        out.append(np.stack([r, gg, b], -1).clip(0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "videos").mkdir()
    (root / "prompts").mkdir()
    for i, frames in enumerate((9, 9, 3)):  # the third is too short for 5 frames
        write_mp4(root / "videos" / f"clip{i}.mp4", _gradient_video(frames, seed=i), fps=16)
        (root / "prompts" / f"clip{i}.txt").write_text(f"a moving gradient number {i} ✓\n", encoding="utf-8")
    torch.manual_seed(0)
    vae = WanVAE(**TINY_VAE).eval()
    save_file(vae.state_dict(), str(root / "vae.safetensors"))
    (root / "vae.json").write_text(json.dumps(TINY_VAE))
    return root


def _encode_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--videos", str(root / "videos"), "--out", str(out), "--vae", str(root / "vae.safetensors"),
            "--vae-config", str(root / "vae.json"), "--prompts", str(root / "prompts"),
            "--frames", "5", "--height", "16", "--width", "24", "--device", "cpu", *extra]  # fmt: skip


def test_video_to_latents_to_shards_to_batches(video_set, tmp_path, capsys):
    enc, mk = tool("encode_latents"), tool("make_shards")
    lat = tmp_path / "latents"

    # Too-short video: a clear error naming it (nothing half-written for it).
    assert enc.main(_encode_args(video_set, lat)) == 2
    err = capsys.readouterr().err
    assert "clip2.mp4" in err and "has 3 frames" in err and "needs 5" in err

    # Two "GPUs": ranks split the files; the short video is skipped and listed.
    for rank in (0, 1):
        assert enc.main(_encode_args(video_set, lat, "--rank", str(rank), "--world-size", "2", "--skip-bad")) == 0
    files = sorted(p.name for p in lat.glob("*.safetensors"))
    assert files == ["clip0.safetensors", "clip1.safetensors"]
    assert "clip2.mp4" in (lat / "skipped-rank0.txt").read_text()
    # Resumable: a second run encodes nothing.
    capsys.readouterr()
    assert enc.main(_encode_args(video_set, lat, "--skip-bad")) == 0
    assert "0 encoded, 2 already there" in capsys.readouterr().out

    s0 = read_sample_file(lat / "clip0.safetensors")
    assert s0.latent.shape == (16, 2, 2, 3) and s0.latent.dtype == torch.bfloat16
    assert s0.first_frame.shape == (3, 16, 24) and s0.first_frame.dtype == torch.uint8
    assert s0.prompt == "a moving gradient number 0 ✓" and s0.meta["source"].endswith("clip0.mp4")
    # The stored latent is the VAE's encoding of the resized/cropped frames.
    vae = WanVAE(**TINY_VAE).eval()
    vae.load_state_dict(load_file(str(video_set / "vae.safetensors")))
    frames = enc.read_frames(video_set / "videos" / "clip0.mp4", 5, 16, 24)
    with torch.no_grad():
        ref = vae.encode(enc.frames_to_video(frames))[0]
    torch.testing.assert_close(s0.latent.float(), ref.bfloat16().float())
    assert torch.equal(s0.first_frame, torch.from_numpy(frames[0]).permute(2, 0, 1))

    shards = tmp_path / "shards"
    assert mk.main(["--latents", str(lat), "--out", str(shards), "--samples-per-shard", "1"]) == 0
    index = json.loads((shards / "index.json").read_text())
    assert index["num_samples"] == 2 and [len(s["samples"]) for s in index["shards"]] == [1, 1]
    assert mk.main(["--latents", str(lat), "--out", str(shards)]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err

    dm = LatentShardDataModule(str(shards), batch_size=2, num_workers=0, rank=0, world_size=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (2, 16, 2, 2, 3) and batch["latents"].dtype == torch.float32
    assert batch["first_frame"].shape == (2, 3, 16, 24) and batch["first_frame"].abs().max() <= 1
    by_prompt = dict(zip(batch["prompts"], batch["latents"]))
    torch.testing.assert_close(by_prompt[s0.prompt], s0.latent.float())


def test_make_shards_reports_bad_inputs(video_set, tmp_path, capsys):
    from sfplus.datamodules.shard_format import Sample, write_sample_file

    mk = tool("make_shards")
    lat = tmp_path / "lat"
    write_sample_file(lat / "a.safetensors", Sample("a", "", latent=torch.zeros(16, 2, 2, 3)))
    assert mk.main(["--latents", str(lat), "--out", str(tmp_path / "o")]) == 2
    assert "a.safetensors" in capsys.readouterr().err  # no prompt
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.txt").write_text("prompt a")
    (tmp_path / "p" / "b.txt").write_text("prompt b")
    write_sample_file(lat / "b.safetensors", Sample("b", "", latent=torch.zeros(16, 3, 2, 3)))
    assert mk.main(["--latents", str(lat), "--prompts", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "differ" in err and "(16, 3, 2, 3)" in err and "(16, 2, 2, 3)" in err
    assert mk.main(["--latents", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- LMDB
def _write_reference_lmdb(path: Path, rows: list[dict], img: bool) -> None:
    """Rows in the reference's format: '{name}_{i}_data' -> bytes, '{name}_shape' -> 'N d1 d2 ...'."""
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, row in enumerate(rows):
            txn.put(f"latents_{i}_data".encode(), row["latents"].astype(np.float16).tobytes())
            txn.put(f"prompts_{i}_data".encode(), row["prompt"].encode("utf-8"))
            if img:
                txn.put(f"img_{i}_data".encode(), row["img"].tobytes())
        shape = " ".join(str(d) for d in (len(rows), *rows[0]["latents"].shape))
        names = ("latents", "prompts", "img") if img else ("latents", "prompts")
        for name in names:  # the reference writes the latent shape under every name
            txn.put(f"{name}_shape".encode(), shape.encode())
    env.close()


def test_import_reference_i2v_lmdb_shards(tmp_path):
    pytest.importorskip("lmdb")
    g = np.random.default_rng(0)
    src = tmp_path / "lmdb"
    expected = {}
    for s in range(2):  # create_lmdb_14b_shards: shard_0, shard_1
        rows = []
        for i in range(3):
            lat = g.standard_normal((2, 16, 2, 3)).astype(np.float16)  # [F, C, H, W]
            im = g.integers(0, 256, (16, 24, 3), dtype=np.uint8)  # 8x the latent size
            prompt = f"shard {s} row {i}" if (s, i) != (1, 2) else "shard 0 row 0"  # one duplicate
            rows.append({"latents": lat, "prompt": prompt, "img": im})
            expected.setdefault(prompt, (lat, im))
        (src / f"shard_{s}").mkdir(parents=True)
        _write_reference_lmdb(src / f"shard_{s}", rows, img=True)

    imp = tool("import_lmdb")
    out = tmp_path / "shards"
    assert imp.main(["--lmdb", str(src), "--out", str(out), "--num-shards", "2", "--dedup"]) == 0
    ds = LatentShardDataset(out)
    assert len(ds) == 5 and ds.fields == ["latents", "first_frame"]
    for i in range(len(ds)):
        item = ds[i]
        lat, im = expected[item["prompts"]]
        torch.testing.assert_close(item["latents"], torch.from_numpy(lat.astype(np.float32)).transpose(0, 1))
        torch.testing.assert_close(item["first_frame"], torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1)


def test_import_reference_ode_lmdb(tmp_path, capsys):
    pytest.importorskip("lmdb")
    g = np.random.default_rng(1)
    src = tmp_path / "ode_lmdb"
    src.mkdir()
    rows = [{"latents": g.standard_normal((5, 2, 16, 2, 3)).astype(np.float16), "prompt": f"p{i}"} for i in range(3)]
    _write_reference_lmdb(src, rows, img=False)
    imp = tool("import_lmdb")
    out = tmp_path / "ode"
    assert imp.main(["--lmdb", str(src), "--out", str(out)]) == 0
    dm = LatentShardDataModule(str(out), batch_size=3, num_workers=0, rank=0, world_size=1, seed=3)
    torch.testing.assert_close(torch.tensor(dm.ode_timesteps), torch.tensor([1000.0, 960.0, 888.8889, 727.2727, 0.0]))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"ode_latents", "ode_timesteps"} and "latents" not in batch
    assert batch["ode_latents"].shape == (3, 5, 16, 2, 2, 3)
    for b, i in enumerate(batch["index"].tolist()):
        ref = torch.from_numpy(rows[i]["latents"].astype(np.float32)).transpose(1, 2)  # [K, C, F, H, W]
        torch.testing.assert_close(batch["ode_latents"][b], ref)
    # Wrong snapshot count for --ode-steps, and no lmdb installed: clear errors.
    assert imp.main(["--lmdb", str(src), "--out", str(tmp_path / "x"), "--ode-steps", "1000,0"]) == 2
    assert "5 snapshots" in capsys.readouterr().err


def test_import_lmdb_without_the_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # makes `import lmdb` raise ImportError
    assert tool("import_lmdb").main(["--lmdb", str(tmp_path / "env"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install lmdb" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- ODE pairs
def _tiny_teacher():
    from sfplus.nets.presets import build_dit

    torch.manual_seed(0)
    net = build_dit("tiny", in_dim=3, out_dim=3)
    net.init_weights()
    with torch.no_grad():  # the zero-initialised head would make every flow 0
        net.head.head.weight.normal_(0, 0.05)
    return net.eval()


def test_teacher_trajectory_snapshots_at_warped_steps():
    from sfplus.conditioning.conditioner import ToyConditioner
    from sfplus.ode_pairs import TrajectoryError, snapshot_indices, snapshot_timesteps, teacher_trajectory
    from sfplus.sampling.samplers import teacher_sample

    net, cond_fn = _tiny_teacher(), ToyConditioner(text_dim=16, text_len=8)
    noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = cond_fn.text(["a red square", "a blue disc"]), cond_fn.negative(2)
    traj = teacher_trajectory(net, noise, cond, uncond, num_steps=8, shift=8.0, guidance=6.0,
                              keep_timesteps=[1000, 750, 500, 250, 0])  # fmt: skip
    assert traj.shape == (2, 5, 3, 2, 4, 4) and traj.dtype == torch.float32
    torch.testing.assert_close(traj[:, 0], noise)
    final = teacher_sample(net, noise, cond, uncond, num_steps=8, shift=8.0, guidance_scale=6.0)
    torch.testing.assert_close(traj[:, -1], final)
    # Snapshot k is the state after the first 2k Euler steps: the same solve stopped there.
    part = teacher_trajectory(net, noise, cond, uncond, num_steps=8, shift=8.0, guidance=6.0, keep_timesteps=[500])
    torch.testing.assert_close(part[:, 0], traj[:, 2])
    assert snapshot_indices(48, [1000, 750, 500, 250, 0]) == [0, 12, 24, 36, 48]
    assert snapshot_timesteps(48, 8.0, [1000, 750, 500, 250, 0]) == pytest.approx([1000, 960, 888.889, 727.273, 0],
                                                                                    abs=1e-3)  # fmt: skip
    with pytest.raises(TrajectoryError, match="not on the 10-step Euler grid"):
        snapshot_indices(10, [1000, 750, 0])


def test_generate_ode_pairs_tool_writes_resumable_shards(tmp_path, capsys):
    gen = tool("generate_ode_pairs")
    save_file(_tiny_teacher().state_dict(), str(tmp_path / "teacher.safetensors"))
    (tmp_path / "prompts.txt").write_text("a red square\n\na blue disc\na red square\na green star\n")
    args = ["--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "ode"),
            "--teacher", str(tmp_path / "teacher.safetensors"), "--preset", "tiny",
            "--preset-overrides", '{"in_dim": 3, "out_dim": 3}', "--toy-text", "--latent-shape", "3,2,4,4",
            "--steps", "4", "--keep", "1000,500,0", "--dtype", "fp32", "--device", "cpu",
            "--batch-size", "2"]  # fmt: skip
    # A damaged teacher file: one line naming it, and the folder is not bound to that teacher afterwards.
    half = tmp_path / "half.safetensors"
    half.write_bytes((tmp_path / "teacher.safetensors").read_bytes()[:3000])
    assert gen.main([*args, "--teacher", str(half)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"generate_ode_pairs: error: weights file {half} is not a valid "
                                               f"safetensors file or is truncated")
    assert gen.main(args) == 0
    ds = LatentShardDataset(tmp_path / "ode")
    assert len(ds) == 3  # blank line and duplicate dropped
    assert sorted(ds[i]["prompts"] for i in range(3)) == ["a blue disc", "a green star", "a red square"]
    assert ds[0]["ode_latents"].shape == (3, 3, 2, 4, 4)
    assert ds.ode_timesteps == pytest.approx([1000.0, 888.8889, 0.0], abs=1e-3)
    capsys.readouterr()
    assert gen.main(args) == 0  # resumable: nothing left to generate, packs again
    assert "generated 0 trajectories" in capsys.readouterr().out
    assert gen.main([*args, "--keep", "1000,600,0"]) == 2
    assert "not on the 4-step Euler grid" in capsys.readouterr().err
    assert gen.main([*args, "--guidance", "3"]) == 2  # resuming with other settings would mix trajectories
    assert "other settings" in capsys.readouterr().err


def test_make_shards_takes_first_frames_from_images(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from sfplus.datamodules.shard_format import Sample, write_sample_file

    lat = tmp_path / "lat"
    write_sample_file(lat / "v.safetensors", Sample("v", "a prompt", latent=torch.zeros(16, 1, 2, 3)))
    (tmp_path / "img").mkdir()
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, 15:] = 255  # right half white; 20x30 has the 2:3 aspect of 16x24, so nothing is cropped
    Image.fromarray(rgb).save(tmp_path / "img" / "v.png")
    out = tmp_path / "shards"
    assert tool("make_shards").main(["--latents", str(lat), "--out", str(out), "--first-frames",
                                     str(tmp_path / "img")]) == 0  # fmt: skip
    frame = LatentShardDataset(out)[0]["first_frame"]
    assert frame.shape == (3, 16, 24)
    assert frame[:, :, :10].max() < -0.9 and frame[:, :, 14:].min() > 0.9
    (tmp_path / "img" / "v.png").unlink()
    assert tool("make_shards").main(["--latents", str(lat), "--out", str(tmp_path / "o2"), "--first-frames",
                                     str(tmp_path / "img")]) == 2  # fmt: skip


@pytest.mark.slow
def test_fit_shipped_runs_a_shipped_recipe_on_random_files(tmp_path):
    """The GPU check tool, on the CPU with tiny nets: the shipped Self-Forcing config as written, random files."""
    row = tool("fit_shipped").main([str(TOOLS.parent / "configs" / "wan2.1" / "t2v_13b_self_forcing_dmd.yaml"),
                                    "--tiny", "--updates", "3", "--work", str(tmp_path),
                                    "--set", "model.init_args.teacher_net=null"])
    assert row["precision"] == "bf16-mixed"  # as shipped
    assert row["first"]["update"] == "generator" and row["critic"]["seconds"] and row["updates"] == 3
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert "teacher_net" not in yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["init_args"]
