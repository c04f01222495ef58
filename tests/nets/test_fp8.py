"""FP8 inference linears: exact against an fp32 emulation of the same quantisation, close to bf16 on a tiny DiT."""

import pytest
import torch
from torch import nn

from sfplus.nets.fp8 import E4M3_MAX, Fp8Linear, psnr, quantize_dit_fp8
from sfplus.nets.presets import build_dit


def test_fp8_linear_equals_its_dequantized_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    fp8 = Fp8Linear(linear)
    x = torch.randn(2, 5, 64)
    # emulate: per-token and per-channel scales, e4m3 rounding, fp32 accumulation, bf16 output, bias in bf16
    xs = x.reshape(-1, 64).abs().amax(1, keepdim=True) / E4M3_MAX
    xq = (x.reshape(-1, 64) / xs).to(torch.float8_e4m3fn).float() * xs
    wq = fp8.qweight.float() * fp8.weight_scale.reshape(-1, 1)
    expected = ((xq @ wq.t()).to(torch.bfloat16) + linear.bias.to(torch.bfloat16)).reshape(2, 5, 48)
    out = fp8(x)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 48)  # the replaced layer's dtype (bf16 matmul)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=1e-2)
    # and the quantised product is a good approximation of the full-precision layer
    assert psnr(out, linear(x)) > 28


def test_fp8_linear_rejects_sizes_float8_matmul_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear(nn.Linear(20, 32))


def test_quantized_dit_stays_close_to_bf16():
    torch.manual_seed(0)
    net = build_dit("tiny").to(torch.bfloat16).eval()
    x = torch.randn(2, 16, 3, 4, 4, dtype=torch.bfloat16)
    t = torch.tensor([900.0, 300.0])
    context = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = net(x, t, context).float()
        swapped = quantize_dit_fp8(net)
        out = net(x, t, context).float()
    per_block = sum(isinstance(m, nn.Linear) for m in build_dit("tiny").blocks[0].modules())
    assert swapped == per_block * len(net.blocks) and swapped > 0
    assert isinstance(net.blocks[0].self_attn.q, Fp8Linear) and type(net.head.head) is nn.Linear
    assert psnr(out, reference) > 25
    assert not torch.equal(out, reference)  # the quantised layers really ran


def test_quantize_needs_a_dit():
    with pytest.raises(TypeError, match="WanDiT"):
        quantize_dit_fp8(nn.Linear(16, 16))


@pytest.mark.gpu
def test_quantized_dit_on_cuda_stays_close_to_bf16():
    """The sm90 rowwise `_scaled_mm` path (the CPU test runs the CPU kernel)."""
    torch.manual_seed(0)
    net = build_dit("tiny").to("cuda", torch.bfloat16).eval()
    x = torch.randn(2, 16, 3, 4, 4, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([900.0, 300.0], device="cuda")
    context = torch.randn(2, 8, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        reference = net(x, t, context).float()
        quantize_dit_fp8(net)
        out = net(x, t, context).float()
    assert psnr(out, reference) > 25 and not torch.equal(out, reference)
