"""The shipped toy teacher (assets/toy_teacher/) loads and still scores what its sidecar records.

``make demo`` distils this teacher; a change to the network, the sampler, the toy codec or the toy metrics that
breaks it fails here. The evaluation is the small one recorded under ``ci_check`` (2 videos per toy prompt, the
teacher's 40- and 4-step rows, same noises), a few seconds on a CPU. On the machine that recorded it the numbers are
bit-identical; elsewhere CPU float reductions differ, so the tolerances allow a few hundredths of drift.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sfplus.nets.presets import build_dit
from sfplus.toy.evaluation import evaluate
from sfplus.weights.checkpoints import load_dit_weights

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "assets" / "toy_teacher" / "toy_teacher.safetensors"
SIDECAR = WEIGHTS.with_suffix(".json")
# |now - recorded| allowed, per metric (accuracies: 2 videos of the 32 in a row).
TOLERANCE = {"prompt_accuracy": 2 / 32, "colour_accuracy": 2 / 32, "direction_accuracy": 2 / 32,
             "sharpness": 0.03, "frechet_distance": 0.15}


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(SIDECAR.read_text())


def test_shipped_toy_teacher_is_small_and_loads(record):
    assert WEIGHTS.stat().st_size < 3e6, "the shipped toy teacher should stay a few MB at most"
    info = record["sfplus"]
    net = build_dit(info["net"], **info.get("net_overrides", {}))
    load_dit_weights(net, WEIGHTS)  # strict: every key and shape
    assert all(torch.isfinite(p).all() for p in net.parameters())
    made = record["made_with"]
    assert made["commands"] and made["trained_at_commit"], "the sidecar says how the teacher was made"


def test_shipped_toy_teacher_scores_its_recorded_metrics(record, tmp_path):
    torch.set_num_threads(1)
    check = record["ci_check"]
    rows = evaluate(str(WEIGHTS), out=str(tmp_path), samples_per_prompt=check["samples_per_prompt"],
                    progress_every_s=-1)
    assert set(rows) == set(check["rows"])
    for name, recorded in check["rows"].items():
        for key, tol in TOLERANCE.items():
            assert abs(rows[name][key] - recorded[key]) <= tol + 1e-9, (
                f"{name}: {key} {rows[name][key]:.3f}, recorded {recorded[key]:.3f} (tolerance {tol:.3f})")
    # What makes it a teacher worth distilling (the 128-video table of the sidecar says the same).
    full = record["toy_metrics"]["rows"]["teacher 40 steps + CFG"]
    assert full["prompt_accuracy"] >= 0.95 and full["sharpness"] >= 0.75
