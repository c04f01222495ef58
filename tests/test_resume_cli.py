"""Never lose a run, as a user meets it: ``--ckpt_path last``, a second ``fit`` into the same folder, the resume
helper of job scripts, and SIGTERM / SIGUSR1 on a ``fit`` whose config lists no Preemption callback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sfplus.cli import main
from tests.helpers import cli_error_line, write_run_config


def fit(cfg: Path, *extra: str) -> None:
    main(["fit", "--config", str(cfg), *extra])


def state(path: Path) -> tuple[int, dict]:
    ckpt = torch.load(path, weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def test_ckpt_path_last_resumes_like_the_explicit_path(tmp_path):
    cfg = write_run_config(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    fit(cfg)
    saved = ckpts / "keep.ckpt"
    saved.write_bytes((ckpts / "last.ckpt").read_bytes())
    step2 = os.stat(ckpts / "iteration-00000002.ckpt").st_ino

    fit(cfg, "--trainer.max_steps", "4", "--ckpt_path", "last")
    by_keyword = state(ckpts / "last.ckpt")
    assert by_keyword[0] == 4
    # Resumed, not restarted: a fresh run would have saved iteration-2 again (a new file renamed into place).
    assert os.stat(ckpts / "iteration-00000002.ckpt").st_ino == step2

    (ckpts / "last.ckpt").unlink()
    saved.rename(ckpts / "last.ckpt")
    fit(cfg, "--trainer.max_steps", "4", "--ckpt_path", str(ckpts / "last.ckpt"))
    by_path = state(ckpts / "last.ckpt")
    assert by_path[0] == 4 and by_keyword[1].keys() == by_path[1].keys()
    assert all(torch.equal(by_keyword[1][k], by_path[1][k]) for k in by_path[1])


def test_ckpt_path_last_or_hpc_without_a_checkpoint_is_refused(tmp_path, capsys):
    cfg = write_run_config(tmp_path)
    for keyword in ("last", "hpc"):
        line = cli_error_line(["fit", "--config", str(cfg), "--ckpt_path", keyword], capsys)
        assert line == (f"sfplus: error: --ckpt_path {keyword}: no checkpoint to resume in "
                        f"{tmp_path / 'run' / 'checkpoints'} (a first run: leave --ckpt_path out)")
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_ckpt_path_last_skips_a_truncated_last_ckpt(tmp_path, capsys):
    cfg = write_run_config(tmp_path)
    fit(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").unlink()  # a hard link to iteration-2: write a new, truncated file
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    fit(cfg, "--trainer.max_steps", "3", "--ckpt_path", "last")
    err = capsys.readouterr().err
    assert f"skipped checkpoint {ckpts / 'last.ckpt'} is truncated or damaged" in err
    assert state(ckpts / "last.ckpt")[0] == 3


def test_ckpt_path_last_refuses_when_no_checkpoint_loads(tmp_path, capsys):
    cfg = write_run_config(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"\x00" * 100)
    line = cli_error_line(["fit", "--config", str(cfg), "--ckpt_path", "last"], capsys)
    assert line.startswith(f"sfplus: error: --ckpt_path last: no checkpoint in {ckpts} loads; the newest: "
                           f"checkpoint {ckpts / 'last.ckpt'} is not a PyTorch file")
    assert (ckpts / "last.ckpt").read_bytes() == b"\x00" * 100


def test_fresh_fit_into_a_used_folder_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    cfg = write_run_config(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    fit(cfg, "--trainer.max_steps", "3")
    before = (ckpts / "last.ckpt").read_bytes()
    line = cli_error_line(["fit", "--config", str(cfg)], capsys)
    assert line.startswith(f"sfplus: error: {ckpts} already holds checkpoints of an earlier run (last.ckpt, ")
    assert line.endswith("resume it with --ckpt_path last, or start over with --overwrite_checkpoints true "
                         "(deletes them)")
    assert (ckpts / "last.ckpt").read_bytes() == before

    # A start over that fails before training (a missing teacher) deletes nothing.
    distill = write_run_config(tmp_path, "sfplus.modules.DistillModule", name="distill.yaml",
                               teacher_checkpoint=str(tmp_path / "no-teacher.safetensors"))
    cli_error_line(["fit", "--config", str(distill), "--overwrite_checkpoints", "true"], capsys)
    assert (ckpts / "last.ckpt").read_bytes() == before

    fit(cfg, "--overwrite_checkpoints", "true")  # 2 steps: iteration-3 of the old run must not survive
    assert sorted(p.name for p in ckpts.iterdir()) == ["iteration-00000001.ckpt", "iteration-00000002.ckpt",
                                                      "last.ckpt"]
    assert state(ckpts / "last.ckpt")[0] == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["overwrite_checkpoints"] is False, "a rerun of the saved config must not delete checkpoints"


def test_resume_helper_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    cfg = write_run_config(tmp_path)
    fit(cfg, "--trainer.max_steps", "3")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").write_bytes((ckpts / "iteration-00000003.ckpt").read_bytes()[:5000])
    (ckpts / "iteration-00000003.ckpt").write_bytes(b"")
    helper = [sys.executable, "-m", "sfplus.callbacks.checkpointing", str(ckpts)]
    out = subprocess.run(helper, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(ckpts / "iteration-00000002.ckpt")
    assert f"sfplus: warning: skipped checkpoint {ckpts / 'last.ckpt'} is truncated or damaged" in out.stderr


# ---- signals, in a real `sfplus fit` process ------------------------------------------------------------------


def run_until_signal(tmp_path: Path, sig: signal.Signals, *extra: str) -> tuple[int, str]:
    """Start `sfplus fit` with a run far too long to finish, send ``sig`` once it has saved a checkpoint."""
    cfg = write_run_config(tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "sfplus", "fit", "--config", str(cfg), "--trainer.max_steps", "100000", *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SLURM_JOB_ID", None)
    log = tmp_path / "fit.log"  # a file, not a pipe: a full pipe would block the run mid-step
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            deadline = time.monotonic() + 120
            while not last.exists():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.05)
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_and_exits_non_zero_without_a_configured_callback(tmp_path, sig):
    code, out = run_until_signal(tmp_path, sig)
    assert code == 128 + sig, out
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"sfplus: stopped by {sig.name}: saved {last}; resume with --ckpt_path last" in out
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 1


def test_preemption_false_opts_out(tmp_path):
    code, out = run_until_signal(tmp_path, signal.SIGUSR1, "--preemption", "false")
    assert code == -signal.SIGUSR1, out  # no handler: the signal's default action ends the process
    assert "stopped by" not in out and "saving at global step" not in out
