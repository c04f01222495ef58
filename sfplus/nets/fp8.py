"""FP8 linear layers for inference: the DiT blocks' matmuls in float8 (e4m3) on Hopper, through `torch._scaled_mm`.

`quantize_dit_fp8(net)` swaps every `nn.Linear` inside the transformer blocks (self/cross-attention q, k, v, o and
the FFN: about 99 % of a step's matmul FLOPs) for an `Fp8Linear`. Embeddings, the time MLP and the head stay in
their dtype: they are small and the outputs are sensitive to them.

Scaling (rowwise, what `_scaled_mm` accelerates on sm90): the weight is quantised once with one fp32 scale per
output channel, the activation on every call with one scale per token, each scale = amax / 448 (the largest e4m3
value). The product accumulates in fp32 and comes out in bf16; the bias is added in bf16.

Inference only: there is no backward through an `Fp8Linear`, and the original weights are not kept (a quantised
net is 1 byte per block weight). Fidelity against bf16 is measured by `tools/bench.py fp8` (PSNR).
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def _rowwise_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, K] float8_e4m3fn, scale [M, 1] fp32) with x ≈ x_q · scale."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """`nn.Linear` replacement with an e4m3 weight and a per-output-channel scale; x [..., in] -> [..., out] in the
    replaced layer's dtype (the matmul itself outputs bf16).

    Buffers: `qweight` [out, in] float8_e4m3fn, `weight_scale` [1, out] fp32, `bias` [out] bf16 or None.
    """

    input_dtype = torch.bfloat16  # what `sfplus.nets.wan.run_linear` casts activations to before the call

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"Fp8Linear needs in/out features divisible by 16 (float8 matmul), got "
                             f"{in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.output_dtype = linear.weight.dtype  # the replaced layer's: an fp32 net keeps fp32 activations
        with torch.no_grad():
            qweight, scale = _rowwise_quantize(linear.weight.detach())
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale.reshape(1, out_features))
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, x_scale = _rowwise_quantize(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(self.output_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_dit_fp8(net: nn.Module) -> int:
    """Replace the `nn.Linear` layers inside ``net.blocks`` with `Fp8Linear` in place; returns how many.

    Call it on a loaded (bf16 or fp32) WanDiT meant for inference. Layers whose sizes are not multiples of 16 stay
    as they are.
    """
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise TypeError(f"quantize_dit_fp8 expects a WanDiT (with .blocks), got {type(net).__name__}")
    swapped = 0
    for block in blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                    setattr(parent, name, Fp8Linear(child))
                    swapped += 1
    return swapped


def psnr(test: torch.Tensor, reference: torch.Tensor, peak_to_peak: float | None = None) -> float:
    """PSNR in dB of ``test`` against ``reference``; the range is the reference's (max - min) unless given."""
    ref = reference.detach().float()
    mse = (test.detach().float() - ref).pow(2).mean().item()
    span = float(ref.max() - ref.min()) if peak_to_peak is None else peak_to_peak
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(span**2 / mse)).item()
