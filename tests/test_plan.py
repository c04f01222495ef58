"""Memory planner: a case computed by hand, monotonicity, advice, errors, the command line."""

from __future__ import annotations

import pytest

from sfplus.plan import GIB, PlanError, main, net_sizes, plan

# Wan2.1-T2V-1.3B (docs/wan_architecture.md, 'Configurations'): exact parameter count and per-block size.
P, P_BLOCK, LAYERS, D, F = 1_418_996_800, 46_440_704, 30, 1536, 8960
P_ROOT = P - LAYERS * P_BLOCK  # embeddings, time projection, head
N = 21 * 30 * 52  # video tokens of a [16, 21, 60, 104] latent, patch (1, 2, 2)
T = 512  # text tokens


def test_meta_parameter_counts_match_the_spec():
    size = net_sizes("wan2.1-t2v-1.3b")
    assert (size.params, size.block_params, size.root_params) == (P, P_BLOCK, 25_775_680)
    assert net_sizes("wan2.1-t2v-14b").params == 14_288_491_584
    assert net_sizes("wan2.1-i2v-14b-480p").image


def test_dmd_1_3b_on_8_gpus_by_hand():
    p = plan(generator="wan2.1-t2v-1.3b", critic="wan2.1-t2v-1.3b", teacher="wan2.1-t2v-1.3b", gpus=8,
             batch_size=1, activation_checkpointing=True, offload_encoders=True, ema=True, overhead_gib=4.0)
    # Sharded states: generator + critic trainable (fp32 master, fp32 grads, two fp32 AdamW moments), fp32 EMA,
    # bf16 teacher, all over 8 GPUs.
    assert p.row("weights (trainable)") == 2 * P * 4 / 8 == 1_418_996_800
    assert p.row("gradients") == 1_418_996_800
    assert p.row("AdamW states") == 2 * 2 * P * 4 / 8 == 2_837_993_600
    assert p.row("EMA (generator)") == P * 4 / 8 == 709_498_400
    assert p.row("teacher (frozen)") == P * 2 / 8 == 354_749_200
    # bf16 root + two blocks gathered, one block's bf16 + fp32 gradients.
    assert p.row("FSDP gathered blocks") == 2 * (P_ROOT + 2 * P_BLOCK) + 6 * P_BLOCK == 515_958_400
    # Activations: fp32 block inputs (4d per token per block) + head (12d) + context k/v of all blocks (12d per
    # text token), then the larger of one recomputed block + backward workspace ((64d+4f) + (8d+4f)) and the
    # teacher's no-grad block ((24d+4f) + bf16 context k/v 4d per text token per block).
    stored = LAYERS * 4 * D * N + 12 * D * N + LAYERS * 12 * D * T
    assert stored == 6_038_323_200 + 603_832_320 + 283_115_520
    recompute = (64 * D + 4 * F) * N + (8 * D + 4 * F) * N
    nograd = (24 * D + 4 * F) * N + LAYERS * 4 * D * T
    assert recompute == 5_971_230_720 and nograd == 2_476_154_880
    assert p.row("activations") == stored + recompute == 12_896_501_760
    assert p.row("fixed overhead") == 4 * GIB
    with pytest.raises(KeyError):
        p.row("frozen encoders")  # offloaded
    total = 1_418_996_800 * 2 + 2_837_993_600 + 709_498_400 + 354_749_200 + 515_958_400 + 12_896_501_760 + 4 * GIB
    assert p.total_bytes == total
    assert p.fits and p.gpu_memory_gib == 80.0 and not p.advice


def test_encoders_and_i2v_clip():
    t2v = plan(generator="wan2.1-t2v-1.3b", critic=None, teacher=None, gpus=1)
    assert t2v.row("frozen encoders") == 5.68e9 * 2 + 0.127e9 * 4
    i2v = plan(generator="wan2.1-i2v-14b-480p", critic=None, teacher=None, gpus=64)
    assert i2v.row("frozen encoders") == 5.68e9 * 2 + 0.127e9 * 4 + 0.63e9 * 2


def test_more_gpus_never_need_more_memory():
    totals = [plan(gpus=g).total_bytes for g in (8, 16, 32, 64, 128)]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    # Only the sharded terms shrink.
    a, b = plan(gpus=16), plan(gpus=32)
    assert a.row("activations") == b.row("activations")
    assert a.row("AdamW states") == 2 * b.row("AdamW states")


def test_checkpointing_batch_and_offload_move_the_right_rows():
    base = plan(gpus=64)
    assert plan(gpus=64, activation_checkpointing=False).row("activations") > 5 * base.row("activations")
    assert plan(gpus=64, batch_size=2).row("activations") == 2 * base.row("activations")
    assert plan(gpus=64, offload_encoders=True).total_bytes == base.total_bytes - base.row("frozen encoders")


def test_advice_when_it_does_not_fit():
    p = plan(gpus=8, activation_checkpointing=False, batch_size=2)
    assert not p.fits
    text = "\n".join(p.advice)
    assert "activation checkpointing on" in text and "offload" in text and "batch 1" in text
    # Each suggestion states the total it would give; turning checkpointing on is computed, not guessed.
    on = plan(gpus=8, activation_checkpointing=True, batch_size=2).total_gib
    assert f"turn activation checkpointing on: {on:.1f} GiB" in text


def test_unknown_preset_and_bad_values_are_clear_errors():
    with pytest.raises(PlanError, match=r"critic: unknown WanDiT preset 'wan9-t2v'; known: .*wan2.1-t2v-14b"):
        plan(critic="wan9-t2v")
    with pytest.raises(PlanError, match="gpus must be >= 1, got 0"):
        plan(gpus=0)
    with pytest.raises(PlanError, match="divisible by the patch"):
        plan(latent_shape=[16, 21, 61, 104])
    with pytest.raises(PlanError, match="latent_shape must be four positive ints"):
        plan(latent_shape=[16, 21, 60])


def test_command_line_prints_the_table(capsys):
    result = main(["--generator", "wan2.1-t2v-1.3b", "--critic", "null", "--teacher", "null", "--gpus", "2",
                   "--gpu_memory_gib", "10"])
    out = capsys.readouterr().out
    assert result.settings["critic"] is None and "teacher (frozen)" not in out
    assert "does NOT fit in a 10 GiB GPU" in out and "total" in out and "activations" in out


def test_causal_generator_adds_its_kv_cache():
    kw = dict(generator="wan2.1-t2v-1.3b", critic="wan2.1-t2v-1.3b", teacher="wan2.1-t2v-1.3b", gpus=1,
              gpu_memory_gib=141)
    bidirectional = plan(**kw)
    causal = plan(**kw, causal_frames_per_block=3)
    cache = causal.row("KV cache (causal rollout)")
    assert cache == 30 * 2 * 1536 * 2 * 21 * 1560  # layers x (k, v) x dim x bf16 x frames x tokens per frame
    assert cache / GIB == pytest.approx(5.62, abs=0.01)
    assert causal.total_bytes == pytest.approx(bidirectional.total_bytes + cache)
    windowed = plan(**kw, causal_frames_per_block=3, local_window_frames=6, sink_frames=3)
    assert windowed.row("KV cache (causal rollout)") == pytest.approx(cache * 9 / 21)
    # past reads of blocks starting at frames 0, 3, ..., 18, capped at the 9 cached frames: 0+3+6+9+9+9+9
    assert windowed.row("past K/V copies (window)") == pytest.approx(cache * 45 / 21)
    with pytest.raises(PlanError, match="causal_frames_per_block"):
        plan(**kw, causal_frames_per_block=4)


def test_sequence_parallel_by_hand_and_when_720p_14b_needs_it():
    """At 720p (75,600 tokens) the 14B DMD recipe's activations alone pass 80 GiB on any number of GPUs; splitting
    each video's tokens over k GPUs divides the per-token terms by k (docs/parallelism.md)."""
    hd = [16, 21, 90, 160]
    one = plan(latent_shape=hd)
    assert not one.fits
    assert any("sequence parallel over 2 GPUs (scale.sequence_parallel: 2" in a for a in one.advice), one.advice
    four = plan(latent_shape=hd, sequence_parallel=4)
    assert four.fits and four.total_gib < 60
    # By hand, 1.3B on 8 GPUs, sp = 2: tokens per GPU N/2; text keys/values replicated; + Ulysses buffers 14d.
    kw = dict(generator="wan2.1-t2v-1.3b", critic="wan2.1-t2v-1.3b", teacher="wan2.1-t2v-1.3b", gpus=8,
              offload_encoders=True)
    sp2 = plan(**kw, sequence_parallel=2)
    n = N // 2
    stored = LAYERS * 4 * D * n + 12 * D * n + LAYERS * 12 * D * T
    assert sp2.row("activations") == stored + (64 * D + 4 * F) * n + (8 * D + 4 * F) * n + 14 * D * n
    assert sp2.row("weights (trainable)") == plan(**kw).row("weights (trainable)")  # still over all 8 GPUs
    causal = [plan(**kw, causal_frames_per_block=3, sequence_parallel=k).row("KV cache (causal rollout)")
              for k in (1, 2)]
    assert causal[1] == causal[0] / 2


def test_sequence_parallel_sizes_that_cannot_split_are_refused():
    with pytest.raises(PlanError, match=r"sequence_parallel=8 must divide the 12 attention heads"):
        plan(generator="wan2.1-t2v-1.3b", critic="wan2.1-t2v-1.3b", teacher=None, gpus=8, sequence_parallel=8)
    with pytest.raises(PlanError, match=r"sequence_parallel=3 must be >= 1 and divide gpus=8"):
        plan(gpus=8, sequence_parallel=3)
    with pytest.raises(PlanError, match=r"sequence_parallel=8 must divide the 1612 tokens per latent frame"):
        plan(gpus=64, sequence_parallel=8, latent_shape=[16, 21, 62, 104])
