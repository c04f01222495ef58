"""sfplus.video_io: safe output names, atomic MP4 and JSON writing."""

import json
import re

import numpy as np
import pytest

import sfplus.video_io as vio
from sfplus.video_io import read_mp4, safe_stem, write_json_atomic, write_mp4

NAME_RE = re.compile(r"^\d{6}_s\d{2}_[a-z0-9-]+_[0-9a-f]{8}$")

NASTY = [
    "a/b/c",
    "../../etc/passwd",
    "..",
    ".",
    "...hidden.file.mp4",
    "",
    "   ",
    "x" * 10_000,
    "\U0001F431\U0001F436\U0001F680",
    "caf\u00e9 na\u00efve \u732b",
    "back\\slash:colon*star?q\"<>|",
    "line\nbreak\ttab\x00nul",
    "A red square moving left",
    "a red square moving left",  # case differs only
    "a red square moving left!",  # punctuation differs only
]


@pytest.mark.parametrize("text", NASTY)
def test_safe_stem_is_short_ascii_safe(text):
    name = safe_stem(text, 12, 3)
    assert name.isascii()
    assert NAME_RE.match(name), name
    assert len(name) <= 6 + 4 + 48 + 10
    assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")
    assert name.startswith("000012_s03_")


def test_safe_stem_unique_and_stable():
    names = [safe_stem(t, 0, 0) for t in NASTY]
    assert len(set(names)) == len(NASTY)
    assert safe_stem("hello world", 1, 0) == safe_stem("hello world", 1, 0)
    assert safe_stem("hello world", 1, 0) != safe_stem("hello world", 1, 1)
    assert safe_stem("hello world", 1, 0) != safe_stem("hello world", 2, 0)
    assert "_hello-world_" in safe_stem("hello world", 1, 0)


def test_safe_stem_readable_slug_and_fallback():
    assert safe_stem("Caf\u00e9 au lait", 0, 0).split("_")[2] == "cafe-au-lait"
    assert safe_stem("\U0001F431", 0, 0).split("_")[2] == "prompt"
    assert safe_stem("", 0, 0).split("_")[2] == "prompt"
    long = safe_stem("word " * 2000, 0, 0)
    assert len(long.split("_")[2]) <= 48 and not long.split("_")[2].endswith("-")


def _frames(t=5, h=7, w=5, color=(200, 30, 60)):
    return np.broadcast_to(np.array(color, dtype=np.uint8), (t, h, w, 3)).copy()


def _listing(d):
    return sorted(p.name for p in d.rglob("*"))


def test_write_mp4_roundtrip_and_upscale(tmp_path):
    out = tmp_path / "sub" / "dir" / "v.mp4"  # parents are created
    write_mp4(out, _frames(t=6, h=8, w=10), fps=8, upscale=3)
    video = read_mp4(out)
    assert video.shape == (6, 24, 30, 3)
    assert video.dtype == np.uint8
    # yuv420p is lossy but a flat colour survives closely.
    assert np.abs(video.astype(int).mean(axis=(0, 1, 2)) - np.array([200, 30, 60])).max() < 12
    assert _listing(tmp_path / "sub" / "dir") == ["v.mp4"]  # no temp file left


def test_write_mp4_odd_size_is_padded(tmp_path):
    out = tmp_path / "odd.mp4"
    write_mp4(out, _frames(t=3, h=7, w=5))
    assert read_mp4(out).shape == (3, 8, 6, 3)


def test_write_mp4_replaces_existing(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    write_mp4(out, _frames(t=4, h=8, w=8))
    assert read_mp4(out).shape[0] == 4
    assert _listing(tmp_path) == ["v.mp4"]


@pytest.mark.parametrize(
    "frames", [np.zeros((3, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((3, 8, 8, 4), np.uint8)]
)
def test_write_mp4_rejects_bad_frames(tmp_path, frames):
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "bad.mp4", frames)
    assert _listing(tmp_path) == []


def test_write_mp4_failure_keeps_old_file(tmp_path, monkeypatch):
    import imageio_ffmpeg

    out = tmp_path / "v.mp4"
    out.write_bytes(b"previous video")

    def broken_writer(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("encoder died")
        yield  # a generator, like the real one

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken_writer)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(out, _frames(t=2, h=8, w=8))
    assert out.read_bytes() == b"previous video"
    assert _listing(tmp_path) == ["v.mp4"]


def test_write_json_atomic(tmp_path):
    out = tmp_path / "meta" / "x.json"
    data = {"prompt": "caf\u00e9 \U0001F431", "seed": 3, "t": [1000, 937.5]}
    write_json_atomic(out, data)
    assert json.loads(out.read_text(encoding="utf-8")) == data
    assert "\U0001F431" in out.read_text(encoding="utf-8")  # not \u-escaped
    write_json_atomic(out, {"v": 2})
    assert json.loads(out.read_text(encoding="utf-8")) == {"v": 2}
    assert _listing(tmp_path / "meta") == ["x.json"]


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    out = tmp_path / "x.json"
    write_json_atomic(out, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(out, {"bad": object()})
    assert json.loads(out.read_text()) == {"v": 1}
    assert _listing(tmp_path) == ["x.json"]


def test_module_uses_atomic_temp_in_same_dir(tmp_path):
    # Temp files must live next to the target (os.replace across file systems is not atomic).
    tmp = vio._atomic_target(tmp_path / "d" / "f.mp4")
    try:
        assert tmp.parent == tmp_path / "d" and tmp.suffix == ".mp4" and tmp.name.startswith(".")
    finally:
        tmp.unlink()


def test_video_writer_reports_progress_per_batch(tmp_path, capsys):
    """A live readout: videos written, videos/s, batches done of the total, ETA (every batch with
    progress_every_s=0)."""
    from types import SimpleNamespace

    import torch

    from sfplus.callbacks import VideoWriter

    writer = VideoWriter(output_dir=str(tmp_path), progress_every_s=0)
    trainer = SimpleNamespace(global_rank=0, ckpt_path=None, num_predict_batches=[3], progress_bar_callback=None)
    writer.setup(trainer, None, "predict")
    writer.on_predict_start(trainer, None)
    video = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)  # [T, H, W, 3]
    for batch_idx in range(2):
        prediction = {"videos": [video], "index": torch.tensor([batch_idx]), "sample": torch.tensor([0]),
                      "text": [f"prompt {batch_idx}"], "prompts": [f"prompt {batch_idx}"], "seed": torch.tensor([1]),
                      "sampler": {"kind": "test"}}
        writer.write_on_batch_end(trainer, None, prediction, None, None, batch_idx)
    writer.write_on_batch_end(trainer, None, {"videos": None}, None, None, 2)  # a batch of skipped outputs
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "videos/s" in ln]
    assert [ln.split(",")[0] for ln in lines] == ["[rank 0] 1 videos", "[rank 0] 2 videos", "[rank 0] 2 videos"]
    assert "batch 1/3" in lines[0] and "ETA" in lines[0] and "batch 3/3" in lines[2]
    quiet = VideoWriter(output_dir=str(tmp_path), progress_every_s=3600)
    quiet.on_predict_start(trainer, None)
    for batch_idx in range(3):
        quiet.write_on_batch_end(trainer, None, {"videos": None}, None, None, batch_idx)
    assert sum("videos/s" in ln for ln in capsys.readouterr().out.splitlines()) == 1  # throttled
