"""LoRA files (sfplus.weights.lora_files): the exported generator LoRA loads into diffusers' WanTransformer3DModel
(through peft, as WanPipeline.load_lora_weights does) and gives sfplus's generator outputs; files read back into an
adapter exactly; files for another base fail in one line naming the keys."""

import pytest
import torch
from safetensors.torch import save_file

from sfplus.modules.groups import LoRA
from sfplus.nets.presets import build_dit
from sfplus.weights.diffusers_keys import diffusers_to_wan, wan_to_diffusers
from sfplus.weights.lora_files import (
    LoRAFileError,
    adapter_to_lora,
    lora_to_adapter,
    merge_lora,
    read_lora_file,
    write_lora_file,
)

pytest.importorskip("peft")
from sfplus.modules.lora import LoRANet, attach_adapters, fresh_adapter, set_adapter_state  # noqa: E402


def _generator(rank=4, alpha=8.0, seed=0, **overrides):
    """A tiny base with random weights and a generator adapter with non-zero B (scale alpha / rank = 2)."""
    torch.manual_seed(seed)
    base = build_dit("tiny", text_len=512, **overrides)
    for p in base.parameters():
        p.data.normal_(0, 0.1)
    switch = attach_adapters(base, LoRA(rank=rank, alpha=alpha))
    gen = LoRANet(base, switch, "generator")
    g = torch.Generator().manual_seed(seed + 1)
    set_adapter_state(gen, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh_adapter(gen, 3).items()})
    return base, switch, gen


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, 3, 4, 6, generator=g), torch.tensor([37.5, 833.3]), torch.randn(2, 512, 16, generator=g)


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
@torch.no_grad()
def test_exported_lora_in_diffusers_matches_generator(tmp_path, layout):
    diffusers = pytest.importorskip("diffusers")
    from tests.nets.test_wan_diffusers_parity import _diffusers_model

    base, switch, gen = _generator()
    x, t, ctx = _inputs()
    ours = gen(x, t, ctx)
    switch.select(None)
    teacher = base(x, t, ctx)
    path = write_lora_file(adapter_to_lora(gen.state_dict(), gen.scale), tmp_path / "g.safetensors", layout,
                           dtype=torch.float32)

    theirs = _diffusers_model(base.config).eval()
    base_sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    theirs.load_state_dict(wan_to_diffusers(base_sd), strict=False)
    assert diffusers_to_wan(theirs.state_dict()).keys() == base_sd.keys()
    sd = diffusers.WanPipeline.lora_state_dict(str(path))
    theirs.load_lora_adapter(sd, prefix="transformer", adapter_name="distilled")
    ref = theirs(x, t, ctx, return_dict=False)[0]
    assert (ours - teacher).abs().max() > 1e-2  # the adapter changes the output ...
    torch.testing.assert_close(ref, ours, atol=2e-5, rtol=1e-4)  # ... and diffusers applies the same change


def test_read_back_is_exact_and_merge_equals_adapter(tmp_path):
    base, switch, gen = _generator()
    lora = adapter_to_lora(gen.state_dict(), gen.scale)
    for layout in ("wan", "diffusers"):
        back = read_lora_file(write_lora_file(lora, tmp_path / f"{layout}.safetensors", layout, torch.float32))
        restored = lora_to_adapter(back, gen.state_dict(), gen.scale, layout)
        assert all(torch.equal(restored[k], v) for k, v in gen.state_dict().items())
    # merged full weights give the generator's outputs from a plain WanDiT
    base_sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    plain = build_dit("tiny", text_len=512)
    plain.load_state_dict(merge_lora(base_sd, lora), strict=True)
    x, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, ctx), gen(x, t, ctx), atol=1e-5, rtol=1e-4)


def test_alpha_and_down_up_names_are_read(tmp_path):
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    save_file({"diffusion_model.blocks.1.ffn.0.lora_down.weight": a,
               "diffusion_model.blocks.1.ffn.0.lora_up.weight": b,
               "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(2.0)}, str(tmp_path / "l.safetensors"))
    lora = read_lora_file(tmp_path / "l.safetensors")
    assert set(lora) == {"blocks.1.ffn.0"}
    torch.testing.assert_close(lora["blocks.1.ffn.0"][1], b * 0.5)


def test_lora_for_another_base_fails_naming_keys(tmp_path):
    _, _, gen = _generator()
    lora = adapter_to_lora(gen.state_dict(), gen.scale)
    wide = {p: (torch.randn(4, 48), b) for p, (a, b) in lora.items()}  # a base of width 48
    path = write_lora_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(LoRAFileError, match=r"shapes\): blocks\.0\.") as err:
        lora_to_adapter(read_lora_file(path), gen.state_dict(), gen.scale, str(path))
    assert "\n" not in str(err.value)
    deep = {**lora, "blocks.7.self_attn.q": lora["blocks.0.self_attn.q"]}  # a base with more blocks
    with pytest.raises(LoRAFileError, match=r"does not: blocks\.7\.self_attn\.q$"):
        lora_to_adapter(deep, gen.state_dict(), gen.scale, "deep")
    save_file({"diffusion_model.blocks.0.norm3.diff": torch.zeros(32)}, str(tmp_path / "diff.safetensors"))
    with pytest.raises(LoRAFileError, match=r"blocks\.0\.norm3\.diff"):
        read_lora_file(tmp_path / "diff.safetensors")
