"""Sequence parallelism in training (#20): DMD runs on a (data x sequence)-parallel mesh of gloo CPU ranks follow
the 1-process run (fp32, per-sample noise: the same sample gets the same noise whatever the mesh) and resume
exactly; so do the other recipes (SiD, CausVid, ODE initialisation, causal diffusion) on a (1 x 2) mesh; and the
layout that splits data over data-parallel ranks only is checked and used by name."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from sfplus.datamodules.samplers import EpochBatchSampler, EvenSplitSampler
from sfplus.layout import Layout, data_rank_and_world, mesh_layout, set_layout
from sfplus.modules.groups import Scale
from tests.test_sharding import NETS, assert_close, distance, run


@pytest.mark.slow
def test_dmd_on_1x2_and_2x2_meshes_matches_one_process_and_resumes_exactly(tmp_path):
    single = run(tmp_path / "single.pt", steps=4, batch=4, nproc=1)
    start = run(tmp_path / "start.pt", steps=0, batch=4, nproc=1)
    for name in ("generator", "critic"):  # both nets moved: the comparison is not of two untouched copies
        assert distance(single[name], start[name]) > 1e-3, name
    # (1 x 2): one data-parallel rank with the whole batch of 4, its tokens split over 2 ranks.
    assert_close(single, run(tmp_path / "sp12.pt", steps=4, batch=4, nproc=2, sp=2), atol=1e-5)
    # (2 x 2): 2 data-parallel ranks with 2 samples each, each pair splitting tokens; FSDP2 over all 4.
    sp22 = run(tmp_path / "sp22.pt", steps=4, batch=2, nproc=4, sp=2)
    assert_close(single, sp22, atol=1e-5)
    first = run(tmp_path / "first.pt", steps=2, batch=2, nproc=4, sp=2, ckpt_out=str(tmp_path / "ckpt"))
    assert distance(first["generator"], sp22["generator"]) > 0
    resumed = run(tmp_path / "resumed.pt", steps=4, batch=2, nproc=4, sp=2, ckpt_in=str(tmp_path / "ckpt"))
    assert_close(sp22, resumed, atol=0)


@pytest.mark.slow
def test_causal_self_forcing_with_gan_on_1x2_mesh_matches_one_process(tmp_path):
    """KV-cache rollouts, block-causal critic, the GAN head on gathered features, activation checkpointing."""
    single = run(tmp_path / "single.pt", steps=4, batch=4, nproc=1, variant="causal-dmd-gan")
    sp = run(tmp_path / "sp.pt", steps=4, batch=4, nproc=2, sp=2, variant="causal-dmd-gan")
    assert set(NETS) <= set(single)
    assert_close(single, sp, atol=1e-5)


#: the other recipes, trained one after the other in one launch per mesh (process start-up dominates their cost).
RECIPES = ("sid", "causvid-tf", "ode", "causal-diffusion", "causal-diffusion-tf")


@pytest.mark.slow
def test_other_recipes_on_1x2_mesh_match_one_process(tmp_path):
    """Every recipe's generator (and critic) steps with activation checkpointing: bidirectional SiD, CausVid with
    teacher forcing (one block-causal step with clean context), ODE initialisation (block-causal regression onto
    trajectories) and causal diffusion (diffusion forcing; teacher forcing with noise-augmented clean context)."""
    single = run(tmp_path / "single.pt", steps=4, batch=4, nproc=1, variant=",".join(RECIPES))
    sp = run(tmp_path / "sp.pt", steps=4, batch=4, nproc=2, sp=2, variant=",".join(RECIPES))
    assert set(single) == set(sp) == set(RECIPES)
    teacher = load_file(str(tmp_path / "teacher.safetensors"))  # where every trained net starts
    differ = {}
    for recipe in RECIPES:
        for name in ("generator", "critic"):  # each net moved: the comparison is not of two untouched copies
            if name in single[recipe]:
                assert distance(single[recipe][name], teacher) > 1e-3, (recipe, name)
        try:
            assert_close(single[recipe], sp[recipe], atol=1e-5)
        except AssertionError as e:
            differ[recipe] = str(e)
    assert not differ, differ  # every recipe that differs, not only the first


class _Dim:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank


class _Mesh:
    """The two dimensions of a ModelParallelStrategy mesh, without processes."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, dp: int, tp: int) -> None:
        self.dims = {"data_parallel": _Dim(dp, 0), "tensor_parallel": _Dim(tp, 0)}

    def __getitem__(self, name: str) -> _Dim:
        return self.dims[name]


def test_mesh_and_setting_must_agree():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1 but scale.sequence_parallel=2"):
        mesh_layout(_Mesh(4, 1), 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 but scale.sequence_parallel=1"):
        mesh_layout(_Mesh(2, 2), 1)
    with pytest.raises(ValueError, match=r"scale.sequence_parallel=2 needs trainer.strategy ModelParallelStrategy"):
        mesh_layout(None, 2)
    mesh = _Mesh(4, 1)
    assert mesh_layout(mesh, 1) == (mesh["data_parallel"], None, None)
    with pytest.raises(ValueError, match=r"scale.sequence_parallel must be >= 1, got 0"):
        Scale(sequence_parallel=0)


def test_samplers_split_over_data_parallel_ranks_only():
    """Both ranks of a sequence-parallel group get the rows of their data-parallel rank."""
    try:
        for sp_rank in (0, 1):
            set_layout(Layout(data_rank=1, data_world=2, sp_rank=sp_rank, sp_size=2))
            assert data_rank_and_world() == (1, 2)
            assert next(iter(EpochBatchSampler(8, 2, shuffle=False))) == [2, 3]
            assert list(EvenSplitSampler(4, 2)) == [[1, 3]]
    finally:
        set_layout(None)
    assert data_rank_and_world() == (0, 1)
