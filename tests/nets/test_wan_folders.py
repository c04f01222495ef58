"""Model folders (Wan-AI, sharded, diffusers), shard-by-shard loading into meta models, preset detection, and
Self-Forcing training files, all with the tiny preset on CPU."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sfplus.nets.presets import build_dit
from sfplus.weights.checkpoints import CheckpointError, read_dit_state_dict
from sfplus.weights.diffusers_keys import wan_to_diffusers
from sfplus.weights.export import diffusers_config_json, wan_config_json
from sfplus.weights.wan_folders import (
    detect_preset,
    folder_shapes,
    load_folder_into,
    locate_weights,
    read_folder_state_dict,
)

W = "diffusion_pytorch_model"


@pytest.fixture(scope="module")
def tiny():
    """A tiny WanDiT with every parameter random (init zeroes some) and its state dict."""
    torch.manual_seed(0)
    model = build_dit("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _save_shards(sd, folder, name=W):
    """Two safetensors shards + a HF-style index json."""
    keys = list(sd)
    half = len(keys) // 2
    files = [f"{name}-00001-of-00002.safetensors", f"{name}-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[:half]}, str(folder / files[0]))
    save_file({k: sd[k] for k in keys[half:]}, str(folder / files[1]))
    weight_map = {k: files[i >= half] for i, k in enumerate(keys)}
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _wan_ai_folder(folder, tiny_model):
    """The non-DiT files of a Wan-AI repo (must be ignored)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, folder / "Wan2.1_VAE.pth")
    torch.save({"token_embedding.weight": torch.zeros(1)}, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    (folder / "google" / "umt5-xxl" / "tokenizer_config.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps(wan_config_json(tiny_model.config)))


def test_wan_ai_single_file_folder(tmp_path, tiny):
    model, sd = tiny
    _wan_ai_folder(tmp_path, model)
    save_file(sd, str(tmp_path / f"{W}.safetensors"))
    _assert_same(read_folder_state_dict(tmp_path), sd)
    _assert_same(read_dit_state_dict(tmp_path), sd)  # the lead's entry point routes folders here
    assert detect_preset(tmp_path) == "tiny"


def test_wan_ai_sharded_folder_and_meta_load(tmp_path, tiny):
    model, sd = tiny
    _wan_ai_folder(tmp_path, model)
    _save_shards(sd, tmp_path)
    wf = locate_weights(tmp_path)
    assert [f.name for f in wf.files] == [f"{W}-00001-of-00002.safetensors", f"{W}-00002-of-00002.safetensors"]
    assert wf.layout == "wan"
    _assert_same(read_folder_state_dict(tmp_path), sd)
    assert folder_shapes(tmp_path) == {k: tuple(v.shape) for k, v in sd.items()}

    with torch.device("meta"):
        empty = build_dit("tiny")
    load_folder_into(empty, tmp_path)
    assert not any(p.is_meta for p in empty.parameters())
    _assert_same(empty.state_dict(), sd)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(empty.eval()(x, t, ctx), model(x, t, ctx), rtol=0, atol=0)

    # a model in another dtype: tensors take the model's dtype; a model on CPU is filled in place
    with torch.device("meta"):
        half = build_dit("tiny").to(torch.bfloat16)
    load_folder_into(half, tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    cpu_model = build_dit("tiny")
    ptr = cpu_model.head.head.weight.data_ptr()
    load_folder_into(cpu_model, tmp_path)
    assert cpu_model.head.head.weight.data_ptr() == ptr
    _assert_same(cpu_model.state_dict(), sd)


def test_pickle_variant_and_prefixed_single_file(tmp_path, tiny):
    _, sd = tiny
    pth = tmp_path / "pth"
    pth.mkdir()
    torch.save(sd, pth / f"{W}.pth")
    _assert_same(read_folder_state_dict(pth), sd)
    # a lightx2v / ComfyUI download: one oddly named file with a "diffusion_model." prefix and FSDP infixes
    other = tmp_path / "lightx2v"
    other.mkdir()
    odd = {("diffusion_model._fsdp_wrapped_module." + k if k.startswith("blocks.") else "diffusion_model." + k): v
           for k, v in sd.items()}
    save_file(odd, str(other / "wan2.1_t2v_tiny_lightx2v_4step.safetensors"))
    _assert_same(read_folder_state_dict(other), sd)
    _assert_same(read_folder_state_dict(other / "wan2.1_t2v_tiny_lightx2v_4step.safetensors"), sd)


def test_diffusers_folders(tmp_path, tiny):
    model, sd = tiny
    dsd = wan_to_diffusers(sd)
    dsd["blocks.0.attn2.norm_added_q.weight"] = torch.zeros(32)  # dummy some converters write; must be dropped
    repo = tmp_path / "repo"
    transformer = repo / "transformer"
    transformer.mkdir(parents=True)
    (repo / "model_index.json").write_text("{}")
    (transformer / "config.json").write_text(json.dumps(diffusers_config_json(model.config)))
    _save_shards(dsd, transformer)
    for path in (repo, transformer):  # the pipeline repo and the transformer folder itself
        assert locate_weights(path).layout == "diffusers"
        _assert_same(read_folder_state_dict(path), sd)
        assert detect_preset(path) == "tiny"
    with torch.device("meta"):
        empty = build_dit("tiny")
    _assert_same(load_folder_into(empty, repo).state_dict(), sd)

    # recognised by key names alone (no config.json), single file
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(wan_to_diffusers(sd), str(bare / f"{W}.safetensors"))
    _assert_same(read_folder_state_dict(bare), sd)


def test_mismatched_preset_names_keys_before_loading(tmp_path, tiny):
    _, sd = tiny
    save_file(sd, str(tmp_path / f"{W}.safetensors"))
    with torch.device("meta"):
        i2v = build_dit("tiny-i2v")
    with pytest.raises(CheckpointError) as info:
        load_folder_into(i2v, tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "missing: blocks.0.cross_attn.k_img.bias" in msg and "(18 in all)" in msg  # 5 per block + 8 img_emb
    assert "patch_embedding.weight: checkpoint (32, 16, 1, 2, 2) vs model (32, 36, 1, 2, 2)" in msg
    assert all(p.is_meta for p in i2v.parameters())  # checked from the headers: nothing was assigned

    with torch.device("meta"):
        deeper = build_dit("tiny", num_layers=3)
    with pytest.raises(CheckpointError, match=r"missing: blocks\.2\."):
        load_folder_into(deeper, tmp_path)


def test_folder_errors(tmp_path, tiny):
    _, sd = tiny
    with pytest.raises(CheckpointError, match="holds no DiT weights"):
        read_folder_state_dict(tmp_path)
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="a.safetensors, b.safetensors"):
        read_folder_state_dict(tmp_path)
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / f"{W}.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        read_folder_state_dict(idx)


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "tiny", "tiny-i2v"])
def test_detect_preset_from_shapes(name):
    with torch.device("meta"):
        sd = build_dit(name).state_dict()
    assert detect_preset(sd) == name
    assert detect_preset(wan_to_diffusers(sd)) == name
    assert detect_preset({"model." + k: tuple(v.shape) for k, v in sd.items()}) == name  # shapes suffice


def test_detect_preset_from_config_and_errors(tmp_path, tiny):
    _, sd = tiny
    save_file(sd, str(tmp_path / f"{W}.safetensors"))
    # the Wan-AI I2V config.json as published (docs/wan_architecture.md, 'Configurations'): config wins over the (here
    # tiny) tensors
    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06,
                "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36, "model_type": "i2v", "num_heads": 40,
                "num_layers": 40, "out_dim": 16, "text_len": 512}
    for cfg, expected in [(official, "wan2.1-i2v-14b-480p"),
                          ({**official, "in_dim": 16, "model_type": "t2v"}, "wan2.1-t2v-14b"),
                          ({**official, "dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30,
                            "in_dim": 16, "model_type": "t2v"}, "wan2.1-t2v-1.3b")]:
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        assert detect_preset(tmp_path) == expected
    (tmp_path / "config.json").write_text(json.dumps({**official, "dim": 3072, "num_layers": 30}))
    with pytest.raises(CheckpointError, match=r"dim=3072.*num_layers=30.*known: wan2.1-t2v-1.3b"):
        detect_preset(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**official, "model_type": "flf2v"}))
    with pytest.raises(CheckpointError, match="FLF2V"):
        detect_preset(tmp_path)
    with pytest.raises(CheckpointError, match="no patch_embedding.weight"):
        detect_preset({"blocks.0.ffn.0.weight": torch.zeros(2, 2)})


def test_self_forcing_pt_with_fsdp_infixes(tmp_path, tiny):
    _, sd = tiny
    def wrapped(scale):
        return {("model._fsdp_wrapped_module." + k if k.startswith("blocks.") else "model." + k): v * scale
                for k, v in sd.items()}
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": wrapped(2.0), "generator_ema": wrapped(1.0), "critic": {"model.x": torch.zeros(1)}},
               path)
    _assert_same(read_dit_state_dict(path, which="ema"), sd)
    raw = read_dit_state_dict(path, which="model")
    _assert_same(raw, {k: v * 2.0 for k, v in sd.items()})
    assert detect_preset(path) == "tiny"
    with torch.device("meta"):
        empty = build_dit("tiny")
    _assert_same(load_folder_into(empty, path, which="ema").state_dict(), sd)
