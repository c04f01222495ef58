"""Errors a user makes or meets at the command line end in one ``sfplus: error:`` line that names the key, file or
folder: bad keys and values, invalid YAML, a negative step count, output folders below a regular file, a full
disk while saving a checkpoint or a video (and nothing half-written is left); duplicate prompts get a warning."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from sfplus.cli import main
from sfplus.disk_full import DiskFullError
from tests.helpers import write_run_config


def error_output(args: list[str], capsys) -> list[str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    return err.strip().splitlines()


def test_unknown_key_and_wrong_type_end_with_the_line_that_matters(tmp_path, capsys):
    cfg = str(write_run_config(tmp_path))
    lines = error_output(["fit", "--config", cfg, "--model.init_args.learning_rate_typo", "1"], capsys)
    assert lines[-1] == ("sfplus: error: --model.init_args.learning_rate_typo: sfplus.modules.DiffusionModule has "
                         "no argument 'learning_rate_typo'")
    assert len(lines) < 15, "jsonargparse's explanation, not the 60-line usage"
    lines = error_output(["fit", "--config", cfg, "--model.init_args.sample_steps", "abc"], capsys)
    assert lines[-1] == "sfplus: error: --model.init_args.sample_steps: Expected a <class 'int'>. Got value: abc"
    lines = error_output(["fit", "--config", cfg, "--trainer.max_steps", "many"], capsys)
    assert lines[-1] == "sfplus: error: --trainer.max_steps: Expected a <class 'int'>. Got value: many"


def test_a_flat_argument_of_an_earlier_version_says_where_it_moved(tmp_path, capsys):
    cfg = str(write_run_config(tmp_path))
    lines = error_output(["fit", "--config", cfg, "--model.init_args.lr", "1e-3"], capsys)
    assert lines[-1].startswith("sfplus: error: --model.init_args.lr: sfplus.modules.DiffusionModule has no argument "
                                "'lr' (now optimizer.lr")
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  init_args:\n    frames_per_block: 3\n")
    lines = error_output(["fit", "--config", cfg, "--config", str(old)], capsys)
    assert lines[-1].endswith("has no argument 'frames_per_block' (now causal.frames_per_block)")


def test_negative_max_steps(tmp_path, capsys):
    lines = error_output(["fit", "--config", str(write_run_config(tmp_path)), "--trainer.max_steps", "-5"], capsys)
    assert lines[-1] == ("sfplus: error: `max_steps` must be a non-negative integer or -1 (infinite steps). "
                         "You passed in -5.")


def test_weights_only_false_is_refused(tmp_path, capsys):
    lines = error_output(["fit", "--config", str(write_run_config(tmp_path)), "--weights_only", "false"], capsys)
    assert lines[-1] == ("sfplus: error: --weights_only false would unpickle arbitrary Python objects: sfplus loads "
                         "checkpoints with weights_only=true only")


def test_invalid_yaml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    assert error_output(["fit", "--config", str(bad)], capsys) == [
        f"sfplus: error: config {bad} is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, "
        f"column 1"]
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert error_output(["predict", "-c", str(listed)], capsys) == [
        f"sfplus: error: config {listed} holds a YAML list, not a mapping of keys"]
    assert error_output(["plan", "--config", str(tmp_path / "none.yaml")], capsys) == [
        f"sfplus: error: config {tmp_path / 'none.yaml'} does not exist"]


def test_output_folders_below_a_regular_file(tmp_path, capsys):
    cfg = str(write_run_config(tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = error_output(["fit", "--config", cfg, "--trainer.default_root_dir", str(blocker / "run")], capsys)[-1]
    assert line == f"sfplus: error: cannot create the folder {blocker / 'run'}: {blocker} is a file, not a folder"
    line = error_output(["fit", "--config", cfg, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                         "--trainer.logger.save_dir", str(blocker / "logs")], capsys)[-1]
    assert line == f"sfplus: error: cannot create the folder {blocker / 'logs'}: {blocker} is a file, not a folder"
    line = error_output(["toy-eval", "--teacher", str(blocker), "--out", str(blocker / "eval")], capsys)[-1]
    assert str(blocker) in line
    assert not (tmp_path / "run").exists()


def test_disk_full_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch):
    """The disk fills halfway through Lightning's write of the first periodic checkpoint (simulated at the file
    write, where a real ENOSPC surfaces)."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    def full_disk(checkpoint, filepath) -> None:
        with open(filepath, "wb") as fh:
            fh.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    ckpts = tmp_path / "run" / "checkpoints"
    line = error_output(["fit", "--config", str(write_run_config(tmp_path))], capsys)[-1]
    target = ckpts / "iteration-00000001.ckpt"
    assert line.startswith(f"sfplus: error: no space left on the device to write {target}: it needs about ")
    assert "(1000 bytes were written before the disk filled)" in line
    assert line.endswith("nothing half-written was kept (free some space or write elsewhere)")
    assert list(ckpts.iterdir()) == [], "no partial checkpoint left"


def test_disk_full_while_writing_a_video(tmp_path, monkeypatch):
    import imageio_ffmpeg

    from sfplus.video_io import write_mp4

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 500)
        yield
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", full_disk)
    out = tmp_path / "videos" / "clip.mp4"
    with pytest.raises(DiskFullError, match=f"no space left on the device to write {out}: it needs more "
                                            r"\(500 bytes were written before the disk filled\)"):
        write_mp4(out, np.zeros((2, 8, 8, 3), np.uint8))
    assert list(out.parent.iterdir()) == [], "no partial video left"


def test_duplicate_prompts_get_a_warning(tmp_path):
    from sfplus.datamodules import PromptDataModule

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na red square\n")
    with pytest.warns(UserWarning, match=rf"prompt source {prompts} holds 1 repeated prompt\(s\) \(prompt 3 "
                                         r"repeats prompt 1: 'a red square'\)"):
        assert PromptDataModule(str(prompts)).prompts() == ["a red square", "a blue circle", "a red square"]
    assert PromptDataModule(str(prompts), deduplicate=True).prompts() == ["a red square", "a blue circle"]
