"""GAN discriminator head on top of a critic WanDiT's hidden states (docs/algorithms.md, 'GAN term (DMD2)', without
the reference's bugs).

Register tokens read the critic's token stream after a few selected blocks: for each selected block one
:class:`GanAttentionBlock` lets that block's register tokens cross-attend to the block's output hidden states
(no self-attention), followed by an FFN. The per-block token outputs (plus, optionally, a time-embedding token) are
flattened and classified by ``LayerNorm -> Linear -> SiLU -> Linear`` into logits.

Differences from the reference (B9): any model width (the reference hard-codes 1536 and 12 heads), any number of
selected blocks and tokens per block; the head does not live inside the critic, it only consumes
``WanDiT.forward(..., return_hidden=blocks)``. The reference uses blocks (13, 21, 29) of the 30-layer 1.3B critic,
one token per block, and a time token ``10 * e`` when ``concat_time_embeddings``.

The defaults are the reference's head (docs/reference_equivalence.md, 'Fixed — GAN head layout'): the register
tokens' RMSNorm has a learnable weight, each block's ``norm2`` (before the FFN) has no affine parameters, and the FFN
is 8192 wide whatever the width (the reference's ``GanAttentionBlock`` default; it never scales it).
``register_norm_weight=False, norm2_affine=True, ffn_dim=None`` (4 x width) is sfplus's head before the alignment,
which older checkpoints hold.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfplus.nets.attention import attention
from sfplus.nets.wan import run_linear  # weight dtype (the critic's hidden states are fp32, the head may be bf16)

__all__ = ["REFERENCE_FFN_DIM", "DiscriminatorHead", "GanAttentionBlock"]

#: The reference's GAN-block FFN width (its ``GanAttentionBlock`` default, used at every width).
REFERENCE_FFN_DIM = 8192


def _f32(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.float()


def _rms(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module (with or without weight) evaluated in float32 whatever its weight dtype."""
    return F.rms_norm(x.float(), norm.normalized_shape, _f32(norm.weight), norm.eps)


class GanAttentionBlock(nn.Module):
    """Register tokens cross-attend to hidden states, then an FFN (pre-norm residuals, no self-attention).

    ``tok' = tok + CrossAttn(q = tok, kv = norm3(hidden))``, ``out = tok' + FFN(norm2(tok'))``.
    q/k get an RMSNorm (as Wan's attention); heads = ``num_heads`` (``dim // head_dim``). ``norm3`` is affine,
    ``norm2`` only with ``norm2_affine`` (the reference's has no parameters; sfplus's head before the alignment had).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float = 1e-6, *,
                 norm2_affine: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GanAttentionBlock: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.eps = num_heads, eps
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=norm2_affine)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """tokens [B, n, dim], hidden [B, L, dim] -> [B, n, dim] (float32 residual stream)."""
        tokens = tokens.float()
        kv_in = F.layer_norm(hidden.float(), self.norm3.normalized_shape, self.norm3.weight.float(),
                             self.norm3.bias.float(), self.eps)
        q = _rms(self.norm_q, run_linear(self.q, tokens)).unflatten(-1, (self.num_heads, -1))
        k = _rms(self.norm_k, run_linear(self.k, kv_in)).unflatten(-1, (self.num_heads, -1))
        v = run_linear(self.v, kv_in).unflatten(-1, (self.num_heads, -1))
        dtype = v.dtype
        out = attention(q.to(dtype), k.to(dtype), v)  # [B, n, heads, head_dim]
        tokens = tokens + run_linear(self.o, out.flatten(2)).float()
        h = F.layer_norm(tokens, self.norm2.normalized_shape, _f32(self.norm2.weight), _f32(self.norm2.bias),
                         self.eps)
        h = run_linear(self.ffn[2], self.ffn[1](run_linear(self.ffn[0], h)))
        return tokens + h.float()


class DiscriminatorHead(nn.Module):
    """Discriminator head reading ``num_blocks`` hidden states of width ``dim``.

    Args:
        dim: the critic's width (1536 for 1.3B, 5120 for 14B).
        num_heads: attention heads of the GAN blocks (``dim // head_dim``; 12 resp. 40 for head_dim 128).
        num_blocks: how many critic blocks are read (one GanAttentionBlock each).
        tokens_per_block: register tokens per read block (reference: 1).
        ffn_dim: FFN width of the GAN blocks (default 8192, the reference's at any width; None: 4 * dim, sfplus's
            before the alignment).
        time_token: append ``time_token_scale * e`` (the critic's time embedding) as one more token
            (reference ``concat_time_embeddings``; scale 10).
        num_classes: logits per sample (1 for the binary GAN).
        eps: epsilon of the GAN blocks' and register tokens' norms (the classifier's LayerNorm uses 1e-5, as the
            reference's).
        register_norm_weight: the register tokens' RMSNorm has a learnable weight (the reference's; False: none,
            sfplus's before the alignment).
        norm2_affine: the GAN blocks' ``norm2`` has weight and bias (False: none, the reference's).
    Register tokens start as N(0, 0.02²) and are RMS-normalised before use.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_blocks: int,
        *,
        tokens_per_block: int = 1,
        ffn_dim: int | None = REFERENCE_FFN_DIM,
        time_token: bool = False,
        time_token_scale: float = 10.0,
        num_classes: int = 1,
        eps: float = 1e-6,
        register_norm_weight: bool = True,
        norm2_affine: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_blocks", num_blocks),
                            ("tokens_per_block", tokens_per_block), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiscriminatorHead.{name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"DiscriminatorHead: dim={dim} is not divisible by num_heads={num_heads}")
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        if not isinstance(ffn_dim, int) or ffn_dim < 1:
            raise ValueError(f"DiscriminatorHead.ffn_dim must be a positive int or None, got {ffn_dim!r}")
        self.dim, self.num_blocks, self.tokens_per_block = dim, num_blocks, tokens_per_block
        self.time_token, self.time_token_scale, self.num_classes, self.eps = time_token, time_token_scale, \
            num_classes, eps
        self.register_tokens = nn.Parameter(torch.randn(num_blocks * tokens_per_block, dim) * 0.02)
        self.register_norm = nn.RMSNorm(dim, eps=eps, elementwise_affine=register_norm_weight)
        self.gan_blocks = nn.ModuleList(GanAttentionBlock(dim, num_heads, ffn_dim, eps, norm2_affine=norm2_affine)
                                        for _ in range(num_blocks))
        n_tok = num_blocks * tokens_per_block + int(time_token)
        # The classifier's LayerNorm keeps torch's default eps 1e-5, as the reference's (found by
        # tools/reference_check.py: eps 1e-6 moved the GAN generator gradients by 5e-6).
        self.cls_pred_branch = nn.Sequential(nn.LayerNorm(n_tok * dim), nn.Linear(n_tok * dim, dim),
                                             nn.SiLU(), nn.Linear(dim, num_classes))

    @staticmethod
    def layout_of(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, int | bool]:
        """The head options a saved head state dict (keys under ``prefix``) was built with: ``ffn_dim``,
        ``register_norm_weight``, ``norm2_affine`` (to name them when a checkpoint does not fit the configured head).
        """
        ffn = state_dict.get(f"{prefix}gan_blocks.0.ffn.0.weight")
        return {"ffn_dim": None if ffn is None else int(ffn.shape[0]),
                "register_norm_weight": f"{prefix}register_norm.weight" in state_dict,
                "norm2_affine": f"{prefix}gan_blocks.0.norm2.weight" in state_dict}

    def layout(self) -> dict[str, int | bool]:
        """This head's options in the form of :meth:`layout_of`."""
        return {"ffn_dim": self.gan_blocks[0].ffn[0].out_features,
                "register_norm_weight": self.register_norm.weight is not None,
                "norm2_affine": self.gan_blocks[0].norm2.weight is not None}

    def reset_parameters(self) -> None:
        """Fresh weights (after meta-device construction): register tokens N(0, 0.02²), layers' own inits,
        norm weights 1."""
        with torch.no_grad():
            self.register_tokens.normal_(0.0, 0.02)
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            elif m is not self and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                with torch.no_grad():
                    m.weight.fill_(1.0)

    def forward(self, hidden: list[torch.Tensor], e: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: ``num_blocks`` tensors [B, L, dim] (critic block outputs); e: time embedding [B, Tf, dim] or
        [B, dim] (required iff ``time_token``). Returns logits [B] (num_classes 1) or [B, num_classes], float32."""
        if len(hidden) != self.num_blocks:
            raise ValueError(f"DiscriminatorHead expects {self.num_blocks} hidden states, got {len(hidden)}")
        batch = hidden[0].shape[0]
        for h in hidden:
            if h.ndim != 3 or h.shape[0] != batch or h.shape[-1] != self.dim:
                raise ValueError(f"hidden states must be [B={batch}, L, dim={self.dim}], got {tuple(h.shape)}")
        reg = _rms(self.register_norm, self.register_tokens).unflatten(0, (self.num_blocks, self.tokens_per_block))
        outs = [blk(reg[i].unsqueeze(0).expand(batch, -1, -1), h)
                for i, (blk, h) in enumerate(zip(self.gan_blocks, hidden))]
        if self.time_token:
            if e is None:
                raise ValueError("DiscriminatorHead(time_token=True) needs the time embedding e")
            # Per-frame embeddings (causal critic) are averaged; the critic's score timestep is shared by all
            # frames, so this is the embedding itself.
            e = e.float().mean(dim=1) if e.ndim == 3 else e.float()
            if e.shape != (batch, self.dim):
                raise ValueError(f"time embedding must be [B={batch}, (Tf,) dim={self.dim}], got {tuple(e.shape)}")
            outs.append(self.time_token_scale * e.unsqueeze(1))
        flat = torch.cat(outs, dim=1).flatten(1)  # [B, n_tok * dim] float32
        ln, fc1, act, fc2 = self.cls_pred_branch
        flat = F.layer_norm(flat, ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
        logits = run_linear(fc2, act(run_linear(fc1, flat))).float()
        return logits.squeeze(-1) if self.num_classes == 1 else logits
