"""Lightning's FSDPStrategy is refused at start-up with one line that says why and what to use instead.

It auto-wraps the whole LightningModule; with the alternating generator/critic manual optimization its losses
leave the unsharded ground truth after the first update (measured on a GPU; README, "Real models, scale, data,
speed"). sfplus shards with ModelParallelStrategy (FSDP2), tested against unsharded runs in test_sharding.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from sfplus.cli import main, strategy_class
from tests.test_cli import tiny_config


@pytest.mark.parametrize("flags, config", [
    (["--trainer.strategy", "fsdp"], None),
    (["--trainer.strategy", "fsdp_cpu_offload"], None),
    (["--trainer.strategy", "FSDPStrategy", "--trainer.strategy.state_dict_type", "sharded"], None),
    ([], {"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"state_dict_type": "sharded"}}),
])
@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_fsdp_strategy_is_refused_with_one_line(tmp_path, capsys, subcommand, flags, config):
    args = [subcommand, "--config", str(tiny_config(tmp_path))]
    if config is not None:
        extra = tmp_path / "strategy.yaml"
        extra.write_text(yaml.safe_dump({"trainer": {"strategy": config}}))
        args += ["--config", str(extra)]
    with pytest.raises(SystemExit) as exit_:
        main(args + flags)
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sfplus: error: "), err
    assert "FSDPStrategy" in err[0] and "ModelParallelStrategy" in err[0] and "data_parallel_size" in err[0]
    assert not (tmp_path / "ckpt").exists()  # refused before anything ran


def test_other_strategies_pass_the_check():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    assert strategy_class("auto") is None and strategy_class(None) is None
    assert strategy_class("ddp") is DDPStrategy
    assert strategy_class({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}) is ModelParallelStrategy


def test_the_sfplus_command_prints_only_the_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sfplus", "fit", "--config", str(tiny_config(tmp_path)),
                           "--trainer.strategy", "fsdp"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("sfplus: error: trainer.strategy 'fsdp' (Lightning's FSDPStrategy)")
