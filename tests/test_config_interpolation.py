"""Configs may interpolate (`${...}`, OmegaConf through LightningCLI's "omegaconf+" parser mode): a shipped config
that writes a value once and refers to it parses to exactly what the same config with every value written out
parses to, for fit and predict, and a command-line override of the source reaches what refers to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from sfplus.cli import main

ROOT = Path(__file__).resolve().parent.parent
INTERPOLATED = sorted(c for c in (ROOT / "configs").rglob("*.yaml") if "${" in c.read_text(encoding="utf-8"))


def parsed(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    return yaml.safe_load(out.out)


def test_shipped_configs_use_interpolation():
    assert len(INTERPOLATED) >= 10


@pytest.mark.parametrize("config", INTERPOLATED, ids=[str(c.relative_to(ROOT / "configs")) for c in INTERPOLATED])
def test_interpolated_config_parses_to_the_written_out_values(config, tmp_path, capsys):
    written_out = tmp_path / config.name
    written_out.write_text(yaml.safe_dump(OmegaConf.to_container(OmegaConf.load(config), resolve=True)))
    assert "${" not in written_out.read_text()
    assert parsed(["fit", "--config", str(config)], capsys) == parsed(["fit", "--config", str(written_out)], capsys)


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_an_override_of_the_source_reaches_what_refers_to_it(subcommand, capsys):
    config = ROOT / "configs" / "wan2.1" / "t2v_13b_self_forcing_sid.yaml"
    m = parsed([subcommand, "--config", str(config), "--model.init_args.conditioner.init_args.model_dir", "/w/1.3B",
                "--model.init_args.generator_optimizer.betas", "[0.5, 0.9]",
                "--model.init_args.generator_optimizer.max_grad_norm", "3.0"],
               capsys)["model"]["init_args"]
    assert m["teacher_checkpoint"] == m["critic_checkpoint"] == "/w/1.3B"
    g, c = m["generator_optimizer"], m["critic_optimizer"]
    assert g["betas"] == c["betas"] == [0.5, 0.9]
    assert g["max_grad_norm"] == c["max_grad_norm"] == 3.0
    assert m["generator_checkpoint"].startswith("runs/t2v-13b-ode-init/")  # not an interpolation: unchanged
