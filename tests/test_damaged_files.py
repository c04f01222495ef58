"""Damaged or wrong files, as a user passes them to each command: one ``sfplus: error:`` line naming the file and
its fault, exit code 2, no traceback, and a pickle payload never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sfplus.cli import main
from sfplus.nets.text import EncoderCheckpointError, read_state_dict
from sfplus.nets.vae import VAEWeightsError, read_vae_state_dict
from sfplus.weights.checkpoints import CheckpointError, read_dit_state_dict
from tests.helpers import cli_error_line, write_run_config, write_tiny_teacher


class Payload:
    """Unpickling this creates ``marker``: proof that a file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def damaged_files(folder: Path, good: bytes) -> dict[str, tuple[Path, str]]:
    """name → (file, the fault the error line must state)."""
    folder.mkdir(exist_ok=True)
    files = {
        "truncated": (good[: len(good) // 2], "is truncated or damaged: its zip archive has no end"),
        "empty": (b"", "is empty (0 bytes)"),
        "random": (bytes(range(7, 256)) * 40, "is not a PyTorch file (it starts with bytes 0708090a"),
    }
    out = {name: (folder / f"{name}.ckpt", fault) for name, (_, fault) in files.items()}
    for name, (data, _) in files.items():
        out[name][0].write_bytes(data)
    torch.save({"state_dict": {}, "x": Payload(folder / "PAYLOAD-RAN")}, folder / "payload.ckpt")
    out["payload"] = (folder / "payload.ckpt", "holds Python code, not only weights, and was refused")
    with open(folder / "legacy-payload.ckpt", "wb") as fh:  # a plain pickle, protocol 2 (torch's legacy format)
        pickle.dump({"state_dict": Payload(folder / "PAYLOAD-RAN")}, fh, protocol=2)
    out["legacy-payload"] = (folder / "legacy-payload.ckpt", "holds Python code, not only weights, and was refused")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step toy run's last.ckpt (the good file the damaged ones are cut from)."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", str(write_run_config(root))])
    return root / "run" / "checkpoints" / "last.ckpt"


COMMANDS = {
    "fit --ckpt_path": lambda cfg, f, out: ["fit", "--config", str(cfg), "--ckpt_path", str(f)],
    "predict --ckpt_path": lambda cfg, f, out: ["predict", "--config", str(cfg), "--ckpt_path", str(f)],
    "toy-eval --teacher": lambda cfg, f, out: ["toy-eval", "--teacher", str(f), "--out", str(out)],
    "export --ckpt_path": lambda cfg, f, out: ["export", "--ckpt_path", str(f), "--out", str(out / "x.safetensors")],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_damaged_checkpoint_is_one_line_from_every_command(tmp_path, trained, command, capsys):
    cfg = write_run_config(tmp_path)
    prefix = "sfplus: error: --ckpt_path: " if command.endswith("--ckpt_path") and "export" not in command else \
        "sfplus: error: "
    for name, (path, fault) in damaged_files(tmp_path / "bad", trained.read_bytes()).items():
        line = cli_error_line(COMMANDS[command](cfg, path, tmp_path / "out"), capsys)
        assert line.startswith(f"{prefix}checkpoint {path} {fault}"), (name, line)
    assert not (tmp_path / "bad" / "PAYLOAD-RAN").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists(), "nothing was started"


def test_toy_eval_checks_the_student_before_sampling(tmp_path, trained, capsys):
    empty = tmp_path / "student.ckpt"
    empty.write_bytes(b"")
    line = cli_error_line(["toy-eval", "--teacher", str(trained), "--student", str(empty), "--out", str(tmp_path)],
                      capsys)
    assert line == f"sfplus: error: checkpoint {empty} is empty (0 bytes): an interrupted copy or save?"


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_damaged_teacher_checkpoint_in_fit(tmp_path, trained, suffix, capsys):
    good = Path(write_tiny_teacher(tmp_path / "teacher.safetensors")) if suffix == ".safetensors" else trained
    data = good.read_bytes()
    bad = tmp_path / f"half{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    cfg = write_run_config(tmp_path, "sfplus.modules.DistillModule", teacher_checkpoint=str(bad))
    line = cli_error_line(["fit", "--config", str(cfg)], capsys)
    fault = "is truncated or damaged: its zip archive has no end" if suffix == ".ckpt" else \
        "is not a valid safetensors file or is truncated"
    assert line.startswith(f"sfplus: error: checkpoint {bad} {fault}"), line


def test_weight_readers_name_the_file(tmp_path, trained):
    """Encoder, VAE and DiT readers (T5/CLIP/VAE weights of the Wan recipes) say which file is damaged."""
    bad = damaged_files(tmp_path / "bad", trained.read_bytes())
    half_st = tmp_path / "half.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "full.safetensors"))
    half_st.write_bytes((tmp_path / "full.safetensors").read_bytes()[:2000])
    for reader, error, what in ((read_state_dict, EncoderCheckpointError, "encoder weights"),
                                (read_vae_state_dict, VAEWeightsError, "VAE weights"),
                                (read_dit_state_dict, CheckpointError, "checkpoint")):
        for name in ("truncated", "empty", "payload"):
            path, fault = bad[name]
            with pytest.raises(error) as info:
                reader(path)
            assert str(info.value).startswith(f"{what} {path} {fault}"), str(info.value)
        with pytest.raises(error, match=f"{what} {half_st} .*truncated"):
            reader(half_st)
    assert not (tmp_path / "bad" / "PAYLOAD-RAN").exists()


def test_damaged_image_is_named_at_setup(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    data = (folder / "a.png").read_bytes()
    (folder / "b.png").write_bytes(data[: len(data) // 2])
    (folder / "b.txt").write_text("a blue square")
    from sfplus.conditioning.i2v import ImageReadError
    from sfplus.datamodules import ImagePromptDataModule

    with pytest.raises(ImageReadError, match=f"image {folder / 'b.png'} is damaged or not an image"):
        ImagePromptDataModule(str(folder), size=[16, 16]).setup("predict")
