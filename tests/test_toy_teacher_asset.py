"""The shipped toy teachers (assets/toy_teacher/, assets/toy_teacher_stream/) load and still score what their
sidecars record.

``make demo`` distils the first, ``make demo-causal`` the second (8-frame clips, two packed latent frames); a change
to the network, the sampler, the toy codec or the toy metrics that breaks one fails here. The evaluation is the
small one recorded under ``ci_check`` (2 videos per toy prompt, the teacher's 40- and 4-step rows, same noises), a
few seconds on a CPU. On the machine that recorded it the numbers are
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
TEACHERS = [ROOT / "assets" / name / f"{name}.safetensors" for name in ("toy_teacher", "toy_teacher_stream")]
# |now - recorded| allowed, per metric (accuracies: 2 videos of the toy teacher's 32 a row, 1 of the streaming
# teacher's 16).
TOLERANCE = {"prompt_accuracy": 2 / 32, "colour_accuracy": 2 / 32, "direction_accuracy": 2 / 32,
             "sharpness": 0.03, "frechet_distance": 0.15}


@pytest.fixture(scope="module", params=TEACHERS, ids=lambda p: p.stem)
def shipped(request) -> tuple[Path, dict]:
    return request.param, json.loads(request.param.with_suffix(".json").read_text())


def test_shipped_toy_teacher_is_small_and_loads(shipped):
    weights, record = shipped
    assert weights.stat().st_size < 3e6, "the shipped toy teacher should stay a few MB at most"
    info = record["sfplus"]
    net = build_dit(info["net"], **info.get("net_overrides", {}))
    load_dit_weights(net, weights)  # strict: every key and shape
    assert all(torch.isfinite(p).all() for p in net.parameters())
    made = record["made_with"]
    assert made["commands"] and made["trained_at_commit"], "the sidecar says how the teacher was made"


def test_shipped_toy_teacher_scores_its_recorded_metrics(shipped, tmp_path):
    weights, record = shipped
    torch.set_num_threads(1)
    check = record["ci_check"]
    rows = evaluate(str(weights), out=str(tmp_path), samples_per_prompt=check["samples_per_prompt"],
                    progress_every_s=-1)
    assert set(rows) == set(check["rows"])
    for name, recorded in check["rows"].items():
        for key, tol in TOLERANCE.items():
            assert abs(rows[name][key] - recorded[key]) <= tol + 1e-9, (
                f"{name}: {key} {rows[name][key]:.3f}, recorded {recorded[key]:.3f} (tolerance {tol:.3f})")
    # What makes it a teacher worth distilling (the 128-video table of the sidecar says the same).
    full = record["toy_metrics"]["rows"]["teacher 40 steps + CFG"]
    assert full["prompt_accuracy"] >= 0.95 and full["sharpness"] >= 0.75
