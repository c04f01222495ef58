"""tools/bench.py: FLOP formulas against the spec, and every workload end to end at tiny sizes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sfplus.nets.presets import get_config

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("sfplus_tools_bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dit_flops_match_the_spec_table():
    """docs/wan_architecture.md, 'FLOPs', at 480x832x81: 2.83e14 (1.3B), 1.68e15 (14B), causal pass 1.98e14."""
    small, large = get_config("wan2.1-t2v-1.3b"), get_config("wan2.1-t2v-14b")
    assert bench.dit_flops(small, 21, 60, 104) == pytest.approx(2.83e14, rel=5e-3)
    assert bench.dit_flops(large, 21, 60, 104) == pytest.approx(1.68e15, rel=5e-3)
    one_pass = bench.causal_flops(small, bench.Sizes(steps=()))  # one call per block
    assert one_pass == pytest.approx(1.98e14, rel=1e-2)
    # 4 steps + refresh = 5 passes (cross-attention keys/values only once)
    assert bench.causal_flops(small, bench.Sizes()) == pytest.approx(0.99e15, rel=1e-2)
    # a KV-cache call attending to more keys costs more; the context terms only count when asked
    assert bench.dit_flops(small, 3, 60, 104, kv_tokens=9360) > bench.dit_flops(small, 3, 60, 104)
    assert bench.dit_flops(small, 3, 60, 104, with_context=False) < bench.dit_flops(small, 3, 60, 104)


def test_vae_flops_on_meta_equal_a_real_count():
    from torch.utils.flop_counter import FlopCounterMode

    sizes = bench.Sizes.tiny()
    torch.manual_seed(0)
    vae = bench.WanVAE(**sizes.vae).to(torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(torch.randn(sizes.latent, dtype=torch.bfloat16))
    counted = bench._vae_flops(sizes)
    assert counted == counter.get_total_flops() > 0


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    video = tmp_path_factory.mktemp("bench") / "causal.mp4"
    runner = bench.Bench(bench.Sizes.tiny(), "cpu", video_path=str(video))
    return {name: runner.run(name) for name in bench.WORKLOADS}


def test_every_row_has_the_common_fields(rows):
    for name, r in rows.items():
        assert set(r) == {"name", "median_s", "peak_mem_gib", "tflops", "extra"} and r["name"] == name
        json.dumps(r)  # one JSON line each
        if name != "plan13b":
            assert r["median_s"] > 0
        if name not in ("plan13b", "train13b", "train13b_causal"):
            assert r["extra"]["flops"] > 0 and r["tflops"] is not None
        assert r["peak_mem_gib"] is None  # CPU: no CUDA memory statistics


def test_dit_and_vae_rows(rows):
    tiny = get_config("tiny")
    assert rows["dit13b"]["extra"]["flops"] == bench.dit_flops(tiny, 6, 2, 4)
    assert rows["dit13b"]["extra"]["params"] == bench.build_dit("tiny").num_parameters()
    assert rows["vae"]["extra"]["out_shape"] == [1, 3, 21, 16, 32]  # 1 + 4·5 frames, 8x upsampled


def test_pipeline_runs_every_step(rows):
    extra = rows["pipe14b"]["extra"]
    assert extra["dit_calls"] == 4
    assert extra["s_per_dit_call"] == pytest.approx(extra["sample_s"] / 4, rel=1e-2, abs=1e-4)


def test_causal_stream_and_its_video(rows):
    r = rows["causal13b"]
    extra = r["extra"]
    assert extra["blocks"] == 2 and extra["frames"] == 21 and extra["dit_calls"] == 2 * (4 + 1) - 1
    assert 0 < extra["first_frame_s"] <= max(r["extra"]["runs_s"]) * 1.5
    assert extra["fps"] == pytest.approx(21 / r["median_s"], rel=1e-2)
    assert "mp4_error" not in extra, extra.get("mp4_error")
    assert extra["mp4_frames"] == 21 and extra["mp4_hw"] == [16, 32]
    assert Path(extra["mp4"]).stat().st_size == extra["mp4_bytes"] > 0


def test_training_steps_update_both_nets(rows):
    extra = rows["train13b"]["extra"]
    losses = extra["losses"]
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["generator_grad_norm"] > 0 and losses["critic_grad_norm"] > 0
    assert rows["train13b"]["median_s"] == pytest.approx(extra["critic_s"] + extra["generator_s"], abs=1e-3)


def test_plan_row_uses_the_training_set_up(rows):
    extra = rows["plan13b"]["extra"]
    rows_gib = extra["plan_rows_gib"]
    assert "EMA (generator)" not in rows_gib and "frozen encoders" not in rows_gib
    assert rows_gib["teacher (frozen)"] == pytest.approx(rows_gib["weights (trainable)"] / 2, rel=1e-3)  # fp32
    assert extra["plan_total_gib"] > 0 and extra["plan_over_measured"] is None


def test_cli_writes_rows_and_rejects_unknown_workloads(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(["dit13b", "--tiny", "--device", "cpu", "--out", str(out), "--tag", "t"])
    assert [r["name"] for r in rows] == ["env", "dit13b"] and rows[0]["tag"] == "t"
    assert json.loads(out.read_text()) == rows
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in printed] == ["env", "dit13b"]
    with pytest.raises(SystemExit) as err:
        bench.main(["dit99b", "--tiny", "--device", "cpu"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["dit13b", "--tiny", "--device", "cpu", "--reps", "0"])


def test_sdpa_probe_reports_each_backend():
    probe = bench.sdpa_probe(torch.device("cpu"), tokens=32, heads=2, head_dim=16, reps=1)
    assert set(probe) == {"flash", "cudnn", "efficient"}
    assert probe["flash"]["ms"] > 0 and probe["flash"]["max_abs_diff_vs_flash"] == 0.0


def test_compiled_blocks_give_the_eager_output():
    """--compile path with the tracing-only 'eager' backend (Inductor would need a compiler and minutes here)."""
    runner = bench.Bench(bench.Sizes.tiny(), "cpu", compile_backend="eager")
    r = runner.run("dit13b")
    assert r["extra"]["compile_backend"] == "eager" and r["extra"]["rel_diff_vs_eager"] < 1e-6
    assert not runner._nets  # the compiled net is not reused by another workload
    with pytest.raises(SystemExit):
        bench.main(["vae", "--tiny", "--device", "cpu", "--compile"])


def test_vae_sweep_variants_give_the_same_video(rows):
    extra = rows["vae_sweep"]["extra"]
    assert [(v["chunk_frames"], v["channels_last"], v["fused_norms"]) for v in extra["variants"]] == list(
        bench.VAE_SWEEP)
    # bf16 weights, 4-channel tiny VAE: the same video up to bf16 rounding (channels-last applies gamma in bf16, as
    # the original does everywhere); fp32 equality is tested in tests/nets/test_vae.py
    assert all(v["max_abs_diff"] < 0.25 for v in extra["variants"])
    assert extra["best"]["median_s"] == rows["vae_sweep"]["median_s"]


def test_fp8_and_compile_variants_report_fidelity():
    rows = bench.main(["dit13b", "causal13b", "--tiny", "--device", "cpu", "--fp8", "--no-video",
                       "--vae-chunk", "2", "--vae-channels-last"])
    env, dit, causal = rows
    assert env["fp8"] and env["vae_chunk"] == 2 and env["vae_channels_last"]
    for r in (dit, causal):
        assert "error" not in r, r
        assert r["extra"]["fp8_linears"] > 0
        assert 15 < r["extra"]["psnr_vs_eager_db"] < float("inf")
    assert causal["extra"]["vae"] == dict(chunk_frames=2, channels_last=True, fused_norms=False)
    with pytest.raises(SystemExit):
        bench.main(["vae", "--tiny", "--device", "cpu", "--fp8"])


def test_training_options_reach_the_nets_and_the_plan():
    """--teacher/--master-dtype/--teacher-dtype: the measured set-up and the plan it is compared with agree."""
    rows = bench.main(["train13b", "plan13b", "--tiny", "--device", "cpu", "--teacher", "wan2.1-t2v-14b",
                       "--master-dtype", "bf16", "--teacher-dtype", "bf16"])
    train, plan = rows[1], rows[2]
    assert "error" not in train and math.isfinite(train["extra"]["losses"]["generator"])
    extra = plan["extra"]
    assert (extra["teacher"], extra["master_dtype"], extra["teacher_dtype"]) == ("tiny", "bf16", "bf16")
    rows_gib = extra["plan_rows_gib"]
    assert rows_gib["AdamW states"] == pytest.approx(2 * rows_gib["weights (trainable)"], rel=1e-3)
    assert rows_gib["teacher (frozen)"] == pytest.approx(rows_gib["weights (trainable)"] / 2, rel=1e-3)
