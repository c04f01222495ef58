"""Step-for-step equivalence of sfplus's algorithms with the reference (Self-Forcing-Plus at 7087227), issue #17.

Runs only where a reference checkout sits in the git-ignored ``.ref/`` folder (see ../shared/bench/README.md):
``.ref/sfp`` holds the reference's ``wan/``, ``utils/``, ``pipeline/`` and ``model/`` folders and ``.ref/bench/shims``
the stand-ins for ``diffusers`` / ``flash_attn`` / ``easydict`` / ``ftfy``. Nothing of the reference is copied: its
modules are imported from ``.ref`` and patched at run time (every patch is listed in ``PATCHES`` and printed).

For every recipe both sides are built at the same size from the SAME Wan-format safetensors (random weights, read
through sfplus's own loader ``sfplus.weights.read_dit_state_dict``), fed the SAME noise and timesteps (the reference's
``torch.randn / randn_like / randint`` calls are replayed from a tape; sfplus gets the same values through a
``SampleNoise`` stand-in) and compared: loss values, gradients of every trainable parameter, and output latents.

usage:
  python tools/reference_check.py [--device cpu|cuda] [--size small|1.3b] [--latent FxHxW] [--json OUT.json] [row ...]
rows: bidir_t2v bidir_i2v causal infer_bidir infer_causal sid causvid ode diffusion gan infer_teacher (default: all)

Never imported by the package or its tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import types
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.attention.flex_attention import flex_attention as eager_flex

from sfplus.flow import score_timesteps_from_raw, warp_timesteps
from sfplus.modules.diffusion import DiffusionModule
from sfplus.modules.distill_parts import (
    BidirectionalRollout,
    CausVidStep,
    DMDObjective,
    ExitSteps,
    SelfForcingRollout,
    SiDObjective,
)
from sfplus.nets.causal import BlockCausal
from sfplus.nets.discriminator import DiscriminatorHead
from sfplus.nets.wan import WanConfig, WanDiT
from sfplus.noise import SampleNoise
from sfplus.objectives.dmd import critic_flow_loss
from sfplus.objectives.gan import gan_critic_loss, gan_generator_term
from sfplus.objectives.ode import ode_regression_loss
from sfplus.sampling import causal_sample, few_step_sample
from sfplus.sampling.unipc import unipc_sample
from sfplus.weights import check_state_dict, read_dit_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.environ.get("SFP_REF", os.path.join(ROOT, ".ref", "sfp"))
SHIMS = os.environ.get("SFP_SHIMS", os.path.join(ROOT, ".ref", "bench", "shims"))

PATCHES: list[str] = []  # every run-time patch applied to the reference, in words


def patch(note: str) -> None:
    if note not in PATCHES:
        PATCHES.append(note)


# ---------------------------------------------------------------------------------------------------------------
# importing the reference


def import_reference():
    """Import the reference's modules from .ref with the bench shims; return a namespace of what the checks use."""
    if not os.path.isdir(os.path.join(REF, "model")):
        sys.exit(f"no reference checkout at {REF} (see ../shared/bench/README.md)")
    sys.path[:0] = [SHIMS, REF]
    for name in ("wan", "pipeline"):  # skip the package __init__s (full Wan pipelines / eager imports)
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(REF, name)]
        sys.modules[name] = mod
    patch("`wan/__init__.py` and `pipeline/__init__.py` skipped (empty package stand-ins, as ref_baseline.py does)")
    from diffusers.models import modeling_utils  # the shim

    if not torch.cuda.is_available():  # t5.py evaluates torch.cuda.current_device() as a default argument at import
        torch.cuda.current_device = lambda: 0
        patch("CPU runs only: `torch.cuda.current_device()` returns 0 (wan/modules/t5.py calls it at import time)")

    try:
        import torchvision  # noqa: F401
    except ImportError:  # only wan/modules/clip.py's CLIP preprocessing uses it, and the CLIP encoder is not built
        from transformers import AutoTokenizer  # noqa: F401  (before the stand-in: transformers probes torchvision)

        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms
        patch("no torchvision installed: an empty `torchvision.transforms` stand-in (used only by the CLIP encoder, "
              "which is not built)")
    import wan.modules.attention as wattn
    import wan.modules.causal_model as wcausal
    import wan.modules.model as wmodel

    def sdpa(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None, causal=False,
             window_size=(-1, -1), deterministic=False, dtype=None, version=None, fa_version=None):
        """flash_attention / attention with the same q_lens / k_lens semantics, in the inputs' dtype."""
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        mask = None
        if k_lens is not None:
            mask = (torch.arange(lk, device=q.device)[None, :] < k_lens.to(q.device)[:, None]).view(b, 1, 1, lk)
        if q_scale is not None:
            q = q * q_scale
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype).transpose(1, 2),
                                           v.to(q.dtype).transpose(1, 2), attn_mask=mask, is_causal=causal,
                                           scale=softmax_scale)
        o = o.transpose(1, 2)
        if q_lens is not None:  # rows past a sample's length are padding (flash leaves them 0)
            keep = torch.arange(lq, device=q.device)[None, :] < q_lens.to(q.device)[:, None]
            o = o * keep[:, :, None, None]
        return o

    for mod in (wattn, wmodel, wcausal):
        for name in ("flash_attention", "attention"):
            if hasattr(mod, name):
                setattr(mod, name, sdpa)
    patch("attention: `flash_attention` / `attention` of wan.modules.{attention,model,causal_model} replaced by "
          "PyTorch SDPA with the same k_lens key mask, computed in the inputs' dtype (flash-attn casts to bf16 and "
          "is CUDA-only)")

    wcausal.flex_attention = eager_flex
    if not torch.cuda.is_available():
        dense_masks: dict = {}

        def dense_flex(query, key, value, block_mask=None, **kw):
            """flex_attention with the block mask's own ``mask_mod`` evaluated densely, through SDPA."""
            lq, lk = query.shape[-2], key.shape[-2]
            if block_mask is None:
                return F.scaled_dot_product_attention(query, key, value)
            ck = (id(block_mask), lq, lk)
            if ck not in dense_masks:
                zero = torch.zeros((), dtype=torch.long, device=query.device)
                q_idx = torch.arange(lq, device=query.device)[:, None]
                kv_idx = torch.arange(lk, device=query.device)[None, :]
                dense_masks.clear()
                dense_masks[ck] = (block_mask, block_mask.mask_mod(zero, zero, q_idx, kv_idx).expand(lq, lk))
            return F.scaled_dot_product_attention(query, key, value, attn_mask=dense_masks[ck][1])

        wcausal.flex_attention = dense_flex
        patch("CPU runs only: `causal_model.flex_attention` evaluates the block mask's own `mask_mod` densely and "
              "calls SDPA (FlexAttention has no backward on the CPU; same mask, same maths)")
    patch("`causal_model.flex_attention`: the eager function instead of the module-level "
          "`torch.compile(..., mode='max-autotune-no-cudagraphs')` wrapper (same maths; no Inductor on the CPU image)")

    dist.broadcast = lambda tensor, src=0, *a, **k: None
    patch("`torch.distributed.broadcast` is a no-op (one process: broadcasting from rank 0 to itself; the reference "
          "calls it without a process group, B16)")

    import pipeline.bidirectional_training as bdt
    import pipeline.self_forcing_training as sft

    sys.modules["pipeline"].SelfForcingTrainingPipeline = sft.SelfForcingTrainingPipeline
    sys.modules["pipeline"].BidirectionalTrainingPipeline = bdt.BidirectionalTrainingPipeline
    import model.base as mb
    import utils.wan_wrapper as ww

    class NoText(torch.nn.Module):
        def __init__(self, *a, **k):
            super().__init__()

    for name in ("WanTextEncoder", "WanVAEWrapper", "WanCLIPEncoder"):
        setattr(mb, name, NoText)
    patch("model.base: WanTextEncoder / WanVAEWrapper / WanCLIPEncoder replaced by empty modules (prompt embeddings, "
          "y and CLIP features are given directly; the encoders are not part of the algorithms)")
    from model.dmd import DMD

    if sys.modules.get("torchvision") is not None and sys.modules["torchvision"].__spec__ is None:
        del sys.modules["torchvision"], sys.modules["torchvision.transforms"]  # the reference holds its own handle

    return SimpleNamespace(registry=modeling_utils.REGISTRY, ww=ww, mb=mb, bdt=bdt, sft=sft, DMD=DMD,
                           wmodel=wmodel, wcausal=wcausal)


@contextlib.contextmanager
def cuda_calls_are_noops(device: torch.device):
    """The reference calls ``.cuda()`` on scheduler tensors (B15); on a CPU run that is the identity."""
    if device.type == "cuda":
        yield
        return
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    patch("CPU runs only: `Tensor.cuda()` is the identity (the reference hard-codes `.cuda()` in "
          "BidirectionalTrainingPipeline's timestep bookkeeping)")
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


# ---------------------------------------------------------------------------------------------------------------
# the random tape: the same draws for both sides


class Tape:
    """Values the two sides draw, in the reference's call order. 5-D normals are stored in the reference layout
    [B, F, C, H, W]; sfplus reads them as [B, C, F, H, W]."""

    def __init__(self, randn: list[torch.Tensor], randint: list[torch.Tensor]):
        self.randn, self.randint = list(randn), list(randint)
        self.log: list[str] = []

    def done(self) -> None:
        if self.randn or self.randint:
            raise AssertionError(f"tape not used up: {len(self.randn)} normals, {len(self.randint)} integers left")


def _shape_of(size) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)):
        return tuple(int(s) for s in size[0])
    return tuple(int(s) for s in size)


@contextlib.contextmanager
def replay(tape: Tape):
    """Patch torch.randn / randn_like / randint so the reference's draws come from ``tape`` (checked by shape and
    by the integer range the reference asks for)."""
    orig = torch.randn, torch.randn_like, torch.randint

    def take_normal(shape, device, dtype):
        if not tape.randn:
            raise AssertionError(f"reference drew an extra normal of shape {shape}")
        v = tape.randn.pop(0)
        if v.ndim == 5 and tuple(v.flatten(0, 1).shape) == tuple(shape):  # the reference draws some on [B*F, ...]
            v = v.flatten(0, 1)
        if tuple(v.shape) != tuple(shape):
            raise AssertionError(f"reference drew a normal of shape {tuple(shape)}, tape holds {tuple(v.shape)}")
        tape.log.append(f"randn{tuple(shape)}")
        return v.to(device=device, dtype=dtype).clone()

    def randn(*size, generator=None, device=None, dtype=None, **kw):
        return take_normal(_shape_of(size), device or "cpu", dtype or torch.get_default_dtype())

    def randn_like(x, *, dtype=None, device=None, **kw):
        return take_normal(x.shape, device or x.device, dtype or x.dtype)

    def randint(*args, generator=None, device=None, dtype=None, **kw):
        args = list(args)
        low, high, size = kw.pop("low", None), kw.pop("high", None), kw.pop("size", None)
        if size is None and args and isinstance(args[-1], (list, tuple, torch.Size)):
            size = args.pop()
        if high is None:
            high = args.pop()
        if low is None:
            low = args.pop() if args else 0
        if not tape.randint:
            raise AssertionError(f"reference drew an extra integer in [{low}, {high}) of size {size}")
        v = tape.randint.pop(0)
        if tuple(v.shape) != tuple(size):
            raise AssertionError(f"reference drew integers of size {tuple(size)}, tape holds {tuple(v.shape)}")
        if int(v.min()) < int(low) or int(v.max()) >= int(high):
            raise AssertionError(f"tape integer {v.tolist()} outside the reference's range [{low}, {high})")
        tape.log.append(f"randint[{int(low)},{int(high)}){tuple(size)}")
        return v.to(device=device or "cpu", dtype=dtype or torch.long).clone()

    torch.randn, torch.randn_like, torch.randint = randn, randn_like, randint
    try:
        yield tape
    finally:
        torch.randn, torch.randn_like, torch.randint = orig


def sf_layout(v: torch.Tensor) -> torch.Tensor:
    return v.permute(0, 2, 1, 3, 4).contiguous() if v.ndim == 5 else v


class ReplayNoise:
    """sfplus's per-sample noise streams (``SampleNoise``) and shared draws, replayed from the same values."""

    def __init__(self, randn: list[torch.Tensor], randint: list[torch.Tensor], shared: list[int], device):
        self.randn_q = [sf_layout(v) for v in randn]
        self.randint_q, self.shared_q, self.device = list(randint), list(shared), device
        self.rand_q: list[torch.Tensor] = []
        self.batch = None

    def __len__(self):
        return self.batch

    def randn(self, shape, dtype=torch.float32):
        v = self.randn_q.pop(0)
        if tuple(v.shape[1:]) != tuple(shape):
            raise AssertionError(f"sfplus drew a normal of per-sample shape {tuple(shape)}, "
                                 f"tape holds {tuple(v.shape)}")
        return v.to(self.device, dtype).clone()

    def randn_like(self, x):
        v = self.randn_q.pop(0)
        if v.shape != x.shape:
            raise AssertionError(f"sfplus drew a normal like {tuple(x.shape)}, tape holds {tuple(v.shape)}")
        return v.to(x.device, x.dtype).clone()

    def randint(self, low, high):
        v = self.randint_q.pop(0).flatten()
        if int(v.min()) < low or int(v.max()) >= high:
            raise AssertionError(f"sfplus integer range [{low}, {high}) does not hold the tape's {v.tolist()}")
        return v.clone()

    def rand(self):
        """[B] uniforms, replayed (the reference's grid-index draws, divided by the grid size)."""
        if not self.rand_q:
            raise AssertionError("sfplus drew an extra uniform")
        return self.rand_q.pop(0).clone()

    def shared_randint(self, kind, high):
        v = self.shared_q.pop(0)
        if not 0 <= v < high:
            raise AssertionError(f"sfplus shared draw {kind} in [0, {high}) cannot be {v}")
        return v

    def done(self):
        if self.randn_q or self.randint_q or self.shared_q or self.rand_q:
            raise AssertionError(f"sfplus left draws unused: {len(self.randn_q)} normals, {len(self.randint_q)} "
                                 f"integers, {len(self.shared_q)} shared, {len(self.rand_q)} uniforms")


def as_sample_noise(replay_noise: ReplayNoise):
    """A SampleNoise subclass instance delegating to ``replay_noise`` (sfplus checks isinstance)."""
    class _Replay(SampleNoise):
        def __init__(self):  # no generators
            self.device = torch.device(replay_noise.device)
            self.generators = [None] * replay_noise.batch

        def randn(self, shape, dtype=torch.float32):
            return replay_noise.randn(shape, dtype)

        def randn_like(self, x):
            return replay_noise.randn_like(x)

        def randint(self, low, high):
            return replay_noise.randint(low, high)

        def rand(self, *shape):
            if shape:
                raise AssertionError("the replay holds per-sample uniforms only")
            return replay_noise.rand()

    return _Replay()


# ---------------------------------------------------------------------------------------------------------------
# sizes, weights and the nets of both sides


SIZES = {
    # small: real Wan classes, 2 blocks, head_dim 32 (RoPE split 12/10/10 on both sides)
    "small": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16),
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, text_len=512),
}
IMAGE_DIM = 1280  # the reference's img_emb input width is hard-coded


def wan_config(size: str, i2v: bool):
    s = SIZES[size]
    return WanConfig(dim=s["dim"], ffn_dim=s["ffn_dim"], num_heads=s["num_heads"], num_layers=s["num_layers"],
                     text_dim=s["text_dim"], text_len=s["text_len"], in_dim=36 if i2v else 16,
                     image_dim=IMAGE_DIM if i2v else None)


def ref_registry_entry(cfg) -> dict:
    return dict(model_type="i2v" if cfg.image_dim else "t2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                num_heads=cfg.num_heads, num_layers=cfg.num_layers, in_dim=cfg.in_dim, text_dim=cfg.text_dim,
                text_len=cfg.text_len, freq_dim=cfg.freq_dim, out_dim=cfg.out_dim)


def write_random_wan_file(cfg, path: str, seed: int) -> None:
    """Random weights in Wan-original layout: official init, then every parameter perturbed (a zero head or unit
    norms would hide mistakes)."""
    torch.manual_seed(seed)
    net = WanDiT(cfg)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p) * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def load_both(cfg, path: str, ref_model: torch.nn.Module, device):
    """Read the file through sfplus's loader; load it into a fresh sfplus WanDiT and into the reference model."""
    sd = read_dit_state_dict(path)
    net = WanDiT(cfg)
    check_state_dict(net, sd, path)
    net.load_state_dict(sd, strict=True)
    missing, unexpected = ref_model.load_state_dict(sd, strict=True)
    return net.to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = a.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def grad_diff(ref_model: torch.nn.Module, sf_model: torch.nn.Module) -> dict:
    """Relative L2 difference of the gradients, over all parameters together and the worst single parameter."""
    ref_p = dict(ref_model.named_parameters())
    num = den = 0.0
    worst, worst_name, n = 0.0, "", 0
    for name, p in sf_model.named_parameters():
        q = ref_p[name]
        if p.grad is None and q.grad is None:
            continue
        a = q.grad.double().cpu() if q.grad is not None else torch.zeros(p.shape, dtype=torch.float64)
        b = p.grad.double().cpu() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)
        num += (a - b).pow(2).sum().item()
        den += a.pow(2).sum().item()
        r = rel(a, b)
        n += 1
        if r > worst:
            worst, worst_name = r, name
    return dict(grad_rel=math.sqrt(num / den) if den else math.sqrt(num), grad_worst=worst,
                grad_worst_param=worst_name, grad_params=n, grad_norm=math.sqrt(den))


RESULTS: list[dict] = []


def report(recipe: str, quantity: str, diff: float, tol: float, **extra) -> None:
    row = dict(recipe=recipe, quantity=quantity, rel_diff=float(f"{diff:.3e}"), tol=tol, ok=bool(diff <= tol),
               **extra)
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# bidirectional DMD (self_forcing_14b_dmd and its I2V twin)


def dmd_args(*, i2v: bool, causal: bool, names: dict, guidance: float, gc: bool) -> SimpleNamespace:
    return SimpleNamespace(
        generator_type="causal" if causal else "bidirectional", i2v=i2v, mixed_precision=False,
        denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True,
        real_name=names["real"], fake_name=names["fake"], generator_name=names["gen"],
        model_kwargs={"timestep_shift": 5.0}, num_frame_per_block=3, same_step_across_blocks=True,
        num_training_frames=21, independent_first_frame=False, gradient_checkpointing=gc,
        num_train_timestep=1000, guidance_scale=guidance, timestep_shift=5.0, ts_schedule=False,
        denoising_loss_type="flow", last_step_only=False, context_noise=0, backward_simulation=True)


class World:
    """Weights, nets and inputs shared by the checks of one recipe."""

    def __init__(self, ref, opts, *, i2v: bool, causal: bool, tag: str, layers: int | None = None):
        self.ref, self.opts, self.i2v, self.causal = ref, opts, i2v, causal
        self.device = torch.device(opts.device)
        self.cfg = wan_config(opts.size, i2v)
        if layers is not None:
            self.cfg = dataclasses.replace(self.cfg, num_layers=layers)
        self.tmp = tempfile.mkdtemp(prefix="refcheck-")
        self.names = {}
        self.files = {}
        for role, seed in (("gen", 1), ("real", 2), ("fake", 3)):
            name = f"{tag}-{role}"
            ref.registry[name] = ref_registry_entry(self.cfg)
            self.names[role] = name
            self.files[role] = os.path.join(self.tmp, f"{name}.safetensors")
            write_random_wan_file(self.cfg, self.files[role], seed)
        f, h, w = opts.latent
        self.B, self.F, self.C, self.H, self.W = opts.batch, f, 16, h, w
        self.tokens_per_frame = (h // 2) * (w // 2)
        g = torch.Generator().manual_seed(7)
        tl, td = self.cfg.text_len, self.cfg.text_dim
        self.ctx = torch.randn(self.B, tl, td, generator=g)
        self.ctx[:, tl // 2:] = 0  # padded rows are zero, as the reference's T5 wrapper leaves them
        self.neg = torch.randn(self.B, tl, td, generator=g)
        self.neg[:, 3 * tl // 4:] = 0
        self.clip = torch.randn(self.B, 257, IMAGE_DIM, generator=g) if i2v else None
        self.y = torch.randn(self.B, 20, f, h, w, generator=g) if i2v else None
        if i2v:
            self.y[:, :4] = (torch.rand(self.B, 4, f, h, w, generator=g) > 0.5).float()

    def build_dmd(self, guidance: float, gc: bool = False, cls=None, after_init=None, **extra):
        """The reference's DMD (or ``cls``: SiD, CausVid, ...) with the three nets loaded from this world's files.
        ``after_init(model)`` runs right after the constructor (run-time patches of attributes it leaves unset);
        ``extra`` are more config keys."""
        torch.manual_seed(0)
        args = dmd_args(i2v=self.i2v, causal=self.causal, names=self.names, guidance=guidance, gc=gc)
        for k, v in extra.items():
            setattr(args, k, v)
        dmd = (cls or self.ref.DMD)(args, self.device)
        if after_init is not None:
            after_init(dmd)
        nets = {}
        for role, wrapper in (("gen", dmd.generator), ("real", dmd.real_score), ("fake", dmd.fake_score)):
            nets[role] = load_both(self.cfg, self.files[role], wrapper.model, self.device)
            wrapper.seq_len = self.F * self.tokens_per_frame
        patch("geometry: `WanDiffusionWrapper.seq_len` (hard-coded 32760 = 21x1560, the padded token count) set to the "
              "run's token count; padded tokens are masked out of attention (k_lens), so real tokens see the same")
        dmd = dmd.to(self.device)
        for w in (dmd.generator, dmd.real_score, dmd.fake_score):
            w.model.freqs = w.model.freqs.to(self.device)
        dmd.real_score.requires_grad_(False)
        nets["real"].requires_grad_(False)
        return dmd, nets

    def cond(self, neg: bool = False) -> dict:
        c = {"context": (self.neg if neg else self.ctx).to(self.device)}
        if self.i2v:
            c.update(clip_fea=self.clip.to(self.device), y=self.y.to(self.device))
        return c

    def ref_kwargs(self) -> dict:
        return dict(clip_fea=None if self.clip is None else self.clip.to(self.device),
                    y=None if self.y is None else self.y.to(self.device))

    def normals(self, n: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(self.B, self.F, self.C, self.H, self.W, generator=g) for _ in range(n)]


def cases(opts):
    """(exit step, raw score timesteps per sample): a mid exit with mid/low t, and exit 0 with the extreme unclamped t
    (906 -> 979.4 and 5 -> 24.8 after the shift-5 warp; clamped values would sit off the grid, see the doc)."""
    both = ((opts.exit if opts.exit is not None else 2, [417, 83]), (0, [906, 5]))
    return both[: opts.cases]


def align_score_grids(dmd) -> None:
    dmd.real_score.scheduler = dmd.scheduler
    dmd.fake_score.scheduler = dmd.scheduler
    patch("B5 alignment (rows marked 'aligned'): the real and fake score wrappers use the generator's shift-5 grid "
          "(as shipped they keep the default shift 8; sfplus uses sigma = t/1000, which equals the shift-5 grid value "
          "at the timesteps drawn here)")


def sfplus_dmd_update(kind, rollout, nets, cond, uncond, g, sf_noise, guidance, frames, device):
    """sfplus's side of one DMD generator or critic update, composed as DistillModule._generator_update /
    _critic_update compose it (shift-5 score timesteps). ``guidance`` is in the reference's convention (s); sfplus
    takes Wan's, s + 1. Returns (loss, the net whose gradients are compared)."""
    if kind == "generator":
        ro = rollout(nets["gen"], cond, g, sf_noise, kind="gen", grad=True)
    else:
        with torch.no_grad():
            ro = rollout(nets["gen"], cond, g, sf_noise, kind="critic", grad=False)
    t = score_timesteps_from_raw(g.randint(0, 1000), frames, shift=5.0).to(device)
    eps = g.randn_like(ro.x0)
    if kind == "generator":
        loss, _ = DMDObjective(guidance + 1.0).generator_loss(
            ro.x0, t, eps, fake=nets["fake"], real=nets["real"], cond=cond, uncond=uncond, mask=ro.loss_mask)
        return loss, nets["gen"]
    return critic_flow_loss(nets["fake"], ro.x0.detach(), t, eps, cond), nets["fake"]


def bidirectional_dmd(ref, opts, i2v: bool):
    recipe = "self_forcing_14b_i2v_dmd" if i2v else "self_forcing_14b_dmd"
    guidance = 6.0 if i2v else 5.0  # the reference's s; Wan's g = s + 1
    world = World(ref, opts, i2v=i2v, causal=False, tag="bi-i2v" if i2v else "bi-t2v")
    steps = warp_timesteps([1000, 750, 500, 250], 5.0)
    B, F_ = world.B, world.F
    shape = [B, F_, world.C, world.H, world.W]
    for variant in ("aligned", "as shipped"):
        for exit_index, t_raw in cases(opts):
            t_raw = torch.tensor(t_raw[:B]).view(B, 1)
            dmd, nets = world.build_dmd(guidance)
            if variant == "aligned":
                align_score_grids(dmd)
            with torch.no_grad():
                for p, q in zip(nets["gen"].parameters(), dmd.generator.model.parameters()):
                    assert torch.equal(p.cpu(), q.detach().cpu())
            cond, uncond = world.cond(), world.cond(neg=True)
            n_norm = exit_index + 2  # x_T, one re-noise per step before the exit, the score noise
            for kind in ("generator", "critic"):
                normals = world.normals(n_norm, seed=100 + exit_index + (kind == "critic"))
                blocks = torch.tensor([F_ // 3])  # the reference's rollout-length draw (21 frames: 7 blocks)
                tape = Tape(normals, [blocks, torch.tensor([exit_index]), t_raw])
                sf_noise = ReplayNoise(normals, [t_raw], [exit_index], world.device)
                sf_noise.batch = B
                g = as_sample_noise(sf_noise)
                rollout = BidirectionalRollout(steps, ExitSteps(4), [world.C, F_, world.H, world.W])
                for m in (*nets.values(), dmd):
                    m.zero_grad(set_to_none=True)
                # reference
                ref_cond = {"prompt_embeds": world.ctx.to(world.device)}
                ref_uncond = {"prompt_embeds": world.neg.to(world.device)}
                with replay(tape), cuda_calls_are_noops(world.device):
                    if kind == "generator":
                        loss_ref, _ = dmd.generator_loss(shape, ref_cond, ref_uncond, None, **world.ref_kwargs())
                    else:
                        loss_ref, _ = dmd.critic_loss(shape, ref_cond, ref_uncond, None, **world.ref_kwargs())
                tape.done()
                loss_ref.backward()
                # sfplus, composed as DistillModule._generator_update / _critic_update do
                loss_sf, model_sf = sfplus_dmd_update(kind, rollout, nets, cond, uncond, g, sf_noise, guidance, F_,
                                                      world.device)
                model_ref = dmd.generator.model if kind == "generator" else dmd.fake_score.model
                sf_noise.done()
                loss_sf.backward()
                gd = grad_diff(model_ref, model_sf)
                tol_loss = tol_grad = opts.tol
                if variant == "as shipped":
                    tol_loss = tol_grad = float("inf")  # reported, not judged: the B5 grid difference
                name = f"{recipe} ({variant})"
                extra = dict(exit=exit_index, t_raw=t_raw.flatten().tolist(), ref=float(loss_ref),
                             sfplus=float(loss_sf))
                report(name, f"{kind} loss", abs(float(loss_ref) - float(loss_sf)) / abs(float(loss_ref)), tol_loss,
                       **extra)
                report(name, f"{kind} gradients ({gd['grad_params']} tensors, worst {gd['grad_worst_param']} "
                       f"{gd['grad_worst']:.1e})", gd["grad_rel"], tol_grad, exit=exit_index)
                del loss_ref, loss_sf
            del dmd, nets


# ---------------------------------------------------------------------------------------------------------------
# causal Self-Forcing DMD (self_forcing_dmd, the 1.3B causal recipe)


def fix_causal_pipeline(pipe, cfg, tokens_per_frame: int, frames: int) -> None:
    """B1 and geometry: a KV cache of [B, frames*tokens, heads, head_dim] per layer (the reference allocates
    [B, 32760, layers, 128] per layer: wrong for 1.3B) and the run's tokens per frame instead of 1560."""
    pipe.frame_seq_length = tokens_per_frame
    pipe.kv_cache_size = frames * tokens_per_frame
    pipe.num_transformer_blocks = cfg.num_layers
    heads, head_dim = cfg.num_heads, cfg.head_dim

    def init_kv(batch_size, dtype, device):
        pipe.kv_cache1 = [{
            "k": torch.zeros([batch_size, pipe.kv_cache_size, heads, head_dim], dtype=dtype, device=device),
            "v": torch.zeros([batch_size, pipe.kv_cache_size, heads, head_dim], dtype=dtype, device=device),
            "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=device)} for _ in range(cfg.num_layers)]

    def init_cross(batch_size, dtype, device):
        pipe.crossattn_cache = [{"k": None, "v": None, "is_init": False} for _ in range(cfg.num_layers)]

    pipe._initialize_kv_cache = init_kv
    pipe._initialize_crossattn_cache = init_cross
    patch("B1 (causal rows): the training pipeline's KV cache is allocated [B, F*tokens, heads, head_dim] per layer "
          "(shipped: [B, 32760, num_layers, 128], which cannot hold the 1.3B model's 12 heads); `frame_seq_length` "
          "= the run's tokens per frame (hard-coded 1560); the cross-attention cache starts empty (it is assigned, "
          "not written into, on first use)")


def clean_context_at_zero(scheduler) -> None:
    """B4 alignment: add_noise at t = 0 returns the clean latent (the reference uses the nearest grid point, 4.98)."""
    orig = scheduler.add_noise

    def add_noise(x0, eps, t):
        if torch.all(t == 0):
            return x0.to(eps.dtype)
        return orig(x0, eps, t)

    scheduler.add_noise = add_noise
    patch("B4 alignment (causal rows marked 'aligned'): `scheduler.add_noise` at t = 0 returns the clean latent (as "
          "shipped it uses the nearest grid point t = 4.98, sigma 0.005, while the net is told t = 0; sfplus writes "
          "exactly clean context for context_noise = 0). The reference still draws (and here discards) that noise")


def detach_kv_after_calls(wrapper) -> None:
    """B22 alignment: after every generator call the KV cache tensors are replaced by detached copies, so a later
    block's loss does not reach earlier blocks' exit steps through the cache."""
    orig = wrapper.forward

    def forward(*a, **k):
        out = orig(*a, **k)
        for layer in k.get("kv_cache") or []:
            layer["k"] = layer["k"].detach().clone()
            layer["v"] = layer["v"].detach().clone()
        return out

    wrapper.forward = forward
    patch("B22 alignment (causal rows marked 'aligned'): after each generator call the KV-cache tensors are replaced "
          "by detached copies (= writing detached K/V). As shipped, a block's loss leaks through the cache into the "
          "exit-step forwards of earlier blocks; sfplus stores detached K/V (its documented choice)")


def causal_dmd(ref, opts):
    recipe = "self_forcing_dmd (causal)"
    guidance = 3.0
    # batch 1: the reference's context refresh multiplies a [B, n] timestep by a [B*n] one, which only broadcasts
    # for B = 1 (every shipped config uses batch 1 per GPU)
    world = World(ref, SimpleNamespace(**{**vars(opts), "batch": 1}), i2v=False, causal=True, tag="causal")
    steps = warp_timesteps([1000, 750, 500, 250], 5.0)
    B, F_ = world.B, world.F
    n_blocks = F_ // 3
    shape = [B, F_, world.C, world.H, world.W]
    for variant in ("aligned", "aligned but B22 as shipped", "as shipped"):
        for exit_index, t_raw in cases(opts):
            t_raw = torch.tensor(t_raw[:B]).view(B, 1)
            for kind in ("generator", "critic"):
                if kind == "critic" and variant.endswith("B22 as shipped"):
                    continue  # the critic's rollout has no graph: B22 cannot matter
                dmd, nets = world.build_dmd(guidance, gc=True)
                dmd._initialize_inference_pipeline()
                fix_causal_pipeline(dmd.inference_pipeline, world.cfg, world.tokens_per_frame, F_)
                if variant.startswith("aligned"):
                    align_score_grids(dmd)
                    clean_context_at_zero(dmd.scheduler)
                if variant == "aligned":
                    detach_kv_after_calls(dmd.generator)
                g0 = torch.Generator().manual_seed(200 + exit_index + 10 * (kind == "critic"))
                x_T = torch.randn(*shape, generator=g0)
                renoise = [[torch.randn(B, 3, world.C, world.H, world.W, generator=g0) for _ in range(exit_index)]
                           for _ in range(n_blocks)]
                ctx_noise = [torch.randn(B, 3, world.C, world.H, world.W, generator=g0) for _ in range(n_blocks)]
                eps = torch.randn(*shape, generator=g0)
                ref_normals = [x_T]
                for b in range(n_blocks):
                    ref_normals += renoise[b] + [ctx_noise[b]]
                ref_normals.append(eps)
                sf_normals = [x_T] + [v for b in range(n_blocks) for v in renoise[b]] + [eps]
                tape = Tape(ref_normals, [torch.tensor([n_blocks]), torch.full((n_blocks,), exit_index), t_raw])
                sf_noise = ReplayNoise(sf_normals, [t_raw], [exit_index], world.device)
                sf_noise.batch = B
                g = as_sample_noise(sf_noise)
                rollout = SelfForcingRollout(steps, ExitSteps(4), [world.C, F_, world.H, world.W], frames_per_block=3)
                ref_cond = {"prompt_embeds": world.ctx.to(world.device)}
                ref_uncond = {"prompt_embeds": world.neg.to(world.device)}
                cond, uncond = world.cond(), world.cond(neg=True)
                with replay(tape), cuda_calls_are_noops(world.device):
                    fn = dmd.generator_loss if kind == "generator" else dmd.critic_loss
                    loss_ref, _ = fn(shape, ref_cond, ref_uncond, None)
                tape.done()
                loss_ref.backward()
                loss_sf, model_sf = sfplus_dmd_update(kind, rollout, nets, cond, uncond, g, sf_noise, guidance, F_,
                                                      world.device)
                model_ref = dmd.generator.model if kind == "generator" else dmd.fake_score.model
                sf_noise.done()
                loss_sf.backward()
                gd = grad_diff(model_ref, model_sf)
                tol = opts.tol if variant == "aligned" else float("inf")
                name = f"{recipe} ({variant})"
                report(name, f"{kind} loss", abs(float(loss_ref) - float(loss_sf)) / abs(float(loss_ref)), tol,
                       exit=exit_index, t_raw=t_raw.flatten().tolist(), ref=float(loss_ref), sfplus=float(loss_sf))
                report(name, f"{kind} gradients ({gd['grad_params']} tensors, worst {gd['grad_worst_param']} "
                       f"{gd['grad_worst']:.1e})", gd["grad_rel"], tol, exit=exit_index)
                del dmd, nets, loss_ref, loss_sf


# ---------------------------------------------------------------------------------------------------------------
# inference: the few-step bidirectional sampler and the causal streaming pipeline


class LatentCatcher(torch.nn.Module):
    """VAE stand-in: ``decode_to_pixel`` keeps the latents it is given (what the comparison reads) and returns them."""

    def __init__(self):
        super().__init__()
        self.latents = None

    def decode_to_pixel(self, latent, use_cache=False):
        self.latents = latent.detach().clone()
        return latent


class GivenText(torch.nn.Module):
    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx

    def forward(self, text_prompts):
        return {"prompt_embeds": self.ctx}


def infer_bidirectional(ref, opts):
    import pipeline.bidirectional_inference as bdi

    world = World(ref, opts, i2v=False, causal=False, tag="infer-bi")
    dmd, nets = world.build_dmd(5.0)
    gen = dmd.generator
    args = SimpleNamespace(denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True)
    steps = warp_timesteps([1000, 750, 500, 250], 5.0)
    shape = [world.B, world.F, world.C, world.H, world.W]
    for variant in ("as shipped (B2: 3 of 4 steps)", "patched: all 4 steps"):
        vae = LatentCatcher()
        # device=cpu: the shipped code indexes the CPU grid with a tensor on `device` (crashes for cuda, B2)
        pipe = bdi.BidirectionalInferencePipeline(args, torch.device("cpu"), generator=gen,
                                                  text_encoder=GivenText(world.ctx.to(world.device)), vae=vae)
        n_steps = 3
        if variant.startswith("patched"):
            pipe.denoising_step_list = torch.cat([pipe.denoising_step_list, torch.zeros(1)])
            n_steps = 4
            patch("B2 (bidirectional inference row 'patched'): a 0 appended to the pipeline's step list so that its "
                  "loop over `list[:-1]` runs all 4 steps (the extra re-noise to t = 0 is drawn and discarded)")
        g = torch.Generator().manual_seed(300)
        normals = [torch.randn(*shape, generator=g) for _ in range(n_steps)]
        # the reference re-noises after every call, the last one included (drawn, then unused)
        tape = Tape(normals[1:] + [torch.randn(*shape, generator=g)], [])
        with torch.no_grad(), replay(tape):
            pipe.inference(normals[0].to(world.device), ["a prompt"])
        tape.done()
        sf_noise = ReplayNoise(normals[1:n_steps], [], [], world.device)
        sf_noise.batch = world.B
        with torch.no_grad():
            out = few_step_sample(nets["gen"], sf_layout(normals[0]).to(world.device), steps[:n_steps], world.cond(),
                                  as_sample_noise(sf_noise))
        sf_noise.done()
        d = rel(vae.latents.permute(0, 2, 1, 3, 4), out)
        report(f"inference: BidirectionalInferencePipeline vs sfplus few_step_sample ({variant})",
               f"latents out ({n_steps} DiT calls each)", d, opts.tol)


def infer_causal(ref, opts):
    import builtins

    import pipeline.causal_inference as ci

    world = World(ref, opts, i2v=False, causal=True, tag="infer-causal")
    dmd, nets = world.build_dmd(3.0)
    gen = dmd.generator
    args = SimpleNamespace(denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True,
                           num_frame_per_block=3, independent_first_frame=False, context_noise=0)
    quiet, builtins.print = builtins.print, (lambda *a, **k: None)
    try:
        pipe = ci.CausalInferencePipeline(args, world.device, generator=gen,
                                          text_encoder=GivenText(world.ctx.to(world.device)), vae=LatentCatcher())
    finally:
        builtins.print = quiet
    fix_causal_pipeline(pipe, world.cfg, world.tokens_per_frame, world.F)
    patch("causal inference: the same KV-cache allocation fix (shipped: 30 layers x 12 heads x 128 x 32760 tokens, "
          "right only for the 1.3B model at 480x832; a no-op there)")
    steps = warp_timesteps([1000, 750, 500, 250], 5.0)
    shape = [world.B, world.F, world.C, world.H, world.W]
    n_blocks = world.F // 3
    g = torch.Generator().manual_seed(400)
    x_T = torch.randn(*shape, generator=g)
    renoise = [torch.randn(world.B, 3, world.C, world.H, world.W, generator=g) for _ in range(3 * n_blocks)]
    tape = Tape(renoise, [])
    builtins.print = lambda *a, **k: None
    try:
        with torch.no_grad(), replay(tape):
            _, latents = pipe.inference(x_T.to(world.device), ["a prompt"], return_latents=True)
    finally:
        builtins.print = quiet
    tape.done()
    sf_noise = ReplayNoise(renoise, [], [], world.device)
    sf_noise.batch = world.B
    with torch.no_grad():
        out = causal_sample(nets["gen"], sf_layout(x_T).to(world.device), steps, world.cond(), frames_per_block=3,
                            generator=as_sample_noise(sf_noise))
    sf_noise.done()
    report("inference: CausalInferencePipeline vs sfplus causal_sample (context_noise 0)",
           f"latents out ({n_blocks} blocks x (4 steps + cache refresh))",
           rel(latents.permute(0, 2, 1, 3, 4), out), opts.tol)


# ---------------------------------------------------------------------------------------------------------------
# the objectives the reference cannot run as shipped (B6-B9): SiD, CausVid (+ teacher forcing), ODE regression,
# causal diffusion (+ teacher forcing), DMD2's GAN term; and the teacher's UniPC sampler


def bidir_case(world, dmd, nets, kind, exit_index, t_raw, seed, sf_generator_loss):
    """One bidirectional-rollout training case (the tape of ``bidirectional_dmd``); returns (loss_ref, loss_sf,
    gradient diff of the trained net). ``sf_generator_loss(x, t, eps, cond, uncond)`` is sfplus's objective."""
    B, F_ = world.B, world.F
    shape = [B, F_, world.C, world.H, world.W]
    normals = world.normals(exit_index + 2, seed=seed)
    tape = Tape(normals, [torch.tensor([F_ // 3]), torch.tensor([exit_index]), t_raw])
    sf_noise = ReplayNoise(normals, [t_raw], [exit_index], world.device)
    sf_noise.batch = B
    g = as_sample_noise(sf_noise)
    rollout = BidirectionalRollout(warp_timesteps([1000, 750, 500, 250], 5.0), ExitSteps(4),
                                   [world.C, F_, world.H, world.W])
    ref_cond = {"prompt_embeds": world.ctx.to(world.device)}
    ref_uncond = {"prompt_embeds": world.neg.to(world.device)}
    cond, uncond = world.cond(), world.cond(neg=True)
    with replay(tape), cuda_calls_are_noops(world.device):
        fn = dmd.generator_loss if kind == "generator" else dmd.critic_loss
        loss_ref, _ = fn(shape, ref_cond, ref_uncond, None)
    tape.done()
    loss_ref.backward()
    if kind == "generator":
        ro = rollout(nets["gen"], cond, g, sf_noise, kind="gen", grad=True)
        t = score_timesteps_from_raw(g.randint(0, 1000), F_, shift=5.0).to(world.device)
        loss_sf = sf_generator_loss(ro.x0, t, g.randn_like(ro.x0), cond, uncond, ro.loss_mask)
        model_ref, model_sf = dmd.generator.model, nets["gen"]
    else:
        with torch.no_grad():
            ro = rollout(nets["gen"], cond, g, sf_noise, kind="critic", grad=False)
        t = score_timesteps_from_raw(g.randint(0, 1000), F_, shift=5.0).to(world.device)
        loss_sf = critic_flow_loss(nets["fake"], ro.x0.detach(), t, g.randn_like(ro.x0), cond)
        model_ref, model_sf = dmd.fake_score.model, nets["fake"]
    sf_noise.done()
    loss_sf.backward()
    return loss_ref, loss_sf, grad_diff(model_ref, model_sf)


def report_pair(name, kind, loss_ref, loss_sf, gd, tol, **extra):
    report(name, f"{kind} loss", abs(float(loss_ref) - float(loss_sf)) / abs(float(loss_ref)), tol,
           ref=float(loss_ref), sfplus=float(loss_sf), **extra)
    extra.pop("t_raw", None)
    report(name, f"{kind} gradients ({gd['grad_params']} tensors, worst {gd['grad_worst_param']} "
           f"{gd['grad_worst']:.1e})", gd["grad_rel"], tol, **extra)


def sid(ref, opts):
    """SiD generator loss (bidirectional T2V rollout, s = 5, alpha = 1) and its critic (DMD's flow loss)."""
    from model.sid import SiD

    def b6(model):
        model.min_score_timestep = 0
        model.num_training_frames = 21
        model.independent_first_frame = False

    patch("B6 (SiD rows): after `SiD.__init__` the three attributes it reads but never sets are assigned their DMD "
          "defaults: `min_score_timestep = 0`, `num_training_frames = 21`, `independent_first_frame = False` (T2V: "
          "SiD's losses have no `clip_fea`/`y` parameters, so I2V cannot be run without rewriting them)")
    world = World(ref, opts, i2v=False, causal=False, tag="sid")
    guidance = 5.0
    objective = SiDObjective(guidance + 1.0, 1.0)
    for variant in ("aligned", "as shipped + B6"):
        for exit_index, t_raw in cases(opts):
            t_raw = torch.tensor(t_raw[:world.B]).view(world.B, 1)
            for kind in ("generator", "critic"):
                dmd, nets = world.build_dmd(guidance, cls=SiD, after_init=b6)
                if variant == "aligned":
                    align_score_grids(dmd)

                def sf_loss(x, t, eps, cond, uncond, mask, nets=nets):
                    return objective.generator_loss(x, t, eps, fake=nets["fake"], real=nets["real"], cond=cond,
                                                    uncond=uncond, mask=mask)[0]

                seed = 500 + exit_index + (kind == "critic")
                loss_ref, loss_sf, gd = bidir_case(world, dmd, nets, kind, exit_index, t_raw, seed, sf_loss)
                tol = opts.tol if variant == "aligned" else float("inf")
                report_pair(f"SiD, bidirectional T2V, s=5 ({variant})", kind, loss_ref, loss_sf, gd, tol,
                            exit=exit_index, t_raw=t_raw.flatten().tolist())
                del dmd, nets


def _block_values(per_frame: torch.Tensor, fpb: int = 3) -> list[torch.Tensor]:
    """sfplus draws per (sample, block): the tape's [B, F] block-constant values as one [B] draw per block."""
    return [per_frame[:, j].clone() for j in range(0, per_frame.shape[1], fpb)]


def _block_index(B: int, F_: int, high: int, seed: int, fpb: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    per_block = torch.randint(0, high, (B, F_ // fpb), generator=g)
    return per_block.repeat_interleave(fpb, dim=1)


def causvid(ref, opts):
    """CausVid (causal generator, data-simulated inputs) without and with teacher forcing: DMD generator loss and
    the critic's flow loss."""
    from model.causvid import CausVid
    from utils.loss import get_denoising_loss

    def b7(model):
        model.denoising_loss_func = get_denoising_loss("flow")()

    patch("B7 (CausVid rows): `denoising_loss_func` (read by `CausVid.critic_loss`, never set: CausVid derives from "
          "BaseModel) is set to the reference's own `utils.loss.get_denoising_loss('flow')()`, as SelfForcingModel "
          "does; the clean latents the trainer never passes (`clean_latent=None`) are passed directly")
    guidance = 3.0
    world = World(ref, opts, i2v=False, causal=True, tag="causvid")
    B, F_ = world.B, world.F
    shape = [B, F_, world.C, world.H, world.W]
    steps = warp_timesteps([1000, 750, 500, 250], 5.0)
    g0 = torch.Generator().manual_seed(600)
    x_clean = torch.randn(*shape, generator=g0)
    for tf in (False, True):
        for variant in ("aligned", "as shipped + B7"):
            for case, t_raw in enumerate(([417, 83], [906, 5])[: opts.cases]):
                t_raw = torch.tensor(t_raw[:B]).view(B, 1)
                for kind in ("generator", "critic"):
                    dmd, nets = world.build_dmd(guidance, cls=CausVid, after_init=b7, teacher_forcing=tf)
                    if variant == "aligned":
                        align_score_grids(dmd)
                    idx = _block_index(B, F_, 4, seed=610 + case + 2 * (kind == "critic"))
                    g = torch.Generator().manual_seed(620 + case + 2 * (kind == "critic"))
                    sim = [torch.randn(*shape, generator=g) for _ in range(4)]
                    eps = torch.randn(*shape, generator=g)
                    picked = torch.stack(sim, 1).gather(1, idx.view(B, 1, F_, 1, 1, 1).expand(
                        B, 1, F_, *shape[2:])).squeeze(1)  # each frame's noise of its block's step
                    tape = Tape(sim + [eps], [idx, t_raw])
                    sf_noise = ReplayNoise([picked, eps], _block_values(idx) + [t_raw], [], world.device)
                    sf_noise.batch = B
                    gs = as_sample_noise(sf_noise)
                    ref_cond = {"prompt_embeds": world.ctx.to(world.device)}
                    ref_uncond = {"prompt_embeds": world.neg.to(world.device)}
                    cond, uncond = world.cond(), world.cond(neg=True)
                    with replay(tape), cuda_calls_are_noops(world.device):
                        fn = dmd.generator_loss if kind == "generator" else dmd.critic_loss
                        loss_ref, _ = fn(shape, ref_cond, ref_uncond, x_clean.to(world.device))
                    tape.done()
                    loss_ref.backward()
                    step = CausVidStep(steps, BlockCausal(3), teacher_forcing=tf)
                    real = sf_layout(x_clean).to(world.device)
                    if kind == "generator":
                        ro = step(nets["gen"], cond, gs, sf_noise, kind="gen", grad=True, real=real)
                        t = score_timesteps_from_raw(gs.randint(0, 1000), F_, shift=5.0).to(world.device)
                        loss_sf, _ = DMDObjective(guidance + 1.0).generator_loss(
                            ro.x0, t, gs.randn_like(ro.x0), fake=nets["fake"], real=nets["real"], cond=cond,
                            uncond=uncond, mask=ro.loss_mask)
                        model_ref, model_sf = dmd.generator.model, nets["gen"]
                    else:
                        with torch.no_grad():
                            ro = step(nets["gen"], cond, gs, sf_noise, kind="critic", grad=False, real=real)
                        t = score_timesteps_from_raw(gs.randint(0, 1000), F_, shift=5.0).to(world.device)
                        loss_sf = critic_flow_loss(nets["fake"], ro.x0.detach(), t, gs.randn_like(ro.x0), cond)
                        model_ref, model_sf = dmd.fake_score.model, nets["fake"]
                    sf_noise.done()
                    loss_sf.backward()
                    tol = opts.tol if variant == "aligned" else float("inf")
                    name = f"CausVid{' + teacher forcing' if tf else ''}, causal 3-frame blocks, s=3 ({variant})"
                    report_pair(name, kind, loss_ref, loss_sf, grad_diff(model_ref, model_sf), tol,
                                t_raw=t_raw.flatten().tolist(), exit=f"k per block {idx[:, ::3].tolist()}")
                    del dmd, nets


def single_generator_model(ref, world, module, cls, shift: float, step_list, **extra):
    """The reference's ODERegression / CausalDiffusion, built through the smallest run-time patch of B8, with the
    generator's weights from ``world``."""
    import model.base as mb

    module.WanTextEncoder = module.WanVAEWrapper = mb.WanTextEncoder  # the empty stand-in (see import_reference)
    if not getattr(cls, "_refcheck_patched", False):
        shipped = cls._initialize_models

        def initialize_models(self, args, device=None):
            shipped(self, args)
            self.scheduler = self.generator.get_scheduler()

        cls._initialize_models = initialize_models
        cls._refcheck_patched = True
    patch("B8 (ODE-regression / causal-diffusion rows): the shipped `_initialize_models(self, args)` overrides are "
          "wrapped to accept the `(args, device)` that `BaseModel.__init__` passes, and after them "
          "`self.scheduler = self.generator.get_scheduler()` is set (the overrides never set it; BaseModel does "
          "exactly this). Their `WanTextEncoder` / `WanVAEWrapper` (imported by name) are the empty stand-ins. The "
          "generator they build without a model name (default 'Wan2.1-T2V-14B') is registered at the run's size")
    ref.registry["Wan2.1-T2V-14B"] = ref_registry_entry(world.cfg)
    torch.manual_seed(0)
    args = SimpleNamespace(generator_type="causal", i2v=False, mixed_precision=False, denoising_step_list=step_list,
                           warp_denoising_step=True, model_kwargs={"timestep_shift": shift}, num_frame_per_block=3,
                           independent_first_frame=False, gradient_checkpointing=False, num_train_timestep=1000,
                           guidance_scale=3.0, timestep_shift=shift, **extra)
    m = cls(args, world.device)
    net = load_both(world.cfg, world.files["gen"], m.generator.model, world.device)
    m.generator.seq_len = world.F * world.tokens_per_frame
    m = m.to(world.device)
    m.generator.model.freqs = m.generator.model.freqs.to(world.device)
    return m, net


def ode_regression(ref, opts):
    """ODE regression of the causal generator on 5-snapshot trajectories at [1000, 960, 888.9, 727.3, 0]."""
    import model.ode_regression as mode

    world = World(ref, opts, i2v=False, causal=True, tag="ode")
    B, F_ = world.B, world.F
    table = warp_timesteps([1000, 750, 500, 250], 8.0) + [0.0]
    g0 = torch.Generator().manual_seed(700)
    traj = torch.randn(B, 5, F_, world.C, world.H, world.W, generator=g0)  # reference layout [B, K, F, C, H, W]
    for case in range(opts.cases):
        m, net = single_generator_model(ref, world, mode, mode.ODERegression, 8.0, [1000, 750, 500, 250, 0])
        idx = _block_index(B, F_, 5, seed=710 + case)
        if case == 0:  # one block of each sample at the clean end (t = 0: excluded from the loss)
            idx[:, :3] = 4
        tape = Tape([], [idx])
        with replay(tape), cuda_calls_are_noops(world.device):
            loss_ref, _ = m.generator_loss(traj.to(world.device), {"prompt_embeds": world.ctx.to(world.device)})
        tape.done()
        loss_ref.backward()
        sf_noise = ReplayNoise([], _block_values(idx), [], world.device)
        sf_noise.batch = B
        loss_sf = ode_regression_loss(net, traj.permute(0, 1, 3, 2, 4, 5).to(world.device), table, world.cond(),
                                      frames_per_block=3, causal=BlockCausal(3), generator=as_sample_noise(sf_noise))
        sf_noise.done()
        loss_sf.backward()
        report_pair("ODE regression, causal 3-frame blocks, shift-8 steps (as shipped + B8)", "generator", loss_ref,
                    loss_sf, grad_diff(m.generator.model, net), opts.tol, exit=f"k per block {idx[:, ::3].tolist()}")
        del m, net


def causal_diffusion(ref, opts):
    """Causal diffusion (diffusion forcing) and teacher forcing: the flow-matching loss of a causal model."""
    import model.diffusion as mdiff

    world = World(ref, opts, i2v=False, causal=True, tag="diff")
    B, F_ = world.B, world.F
    shape = [B, F_, world.C, world.H, world.W]
    g0 = torch.Generator().manual_seed(800)
    x_clean = torch.randn(*shape, generator=g0)
    for tf in (False, True):
        for case in range(opts.cases):
            m, net = single_generator_model(ref, world, mdiff, mdiff.CausalDiffusion, 5.0, [1000, 750, 500, 250],
                                            teacher_forcing=tf, noise_augmentation_max_timestep=0)
            idx = _block_index(B, F_, 1000, seed=810 + case)
            eps = torch.randn(*shape, generator=g0)
            tape = Tape([eps], [idx])
            with replay(tape), cuda_calls_are_noops(world.device):
                loss_ref, _ = m.generator_loss(shape, {"prompt_embeds": world.ctx.to(world.device)}, None,
                                               x_clean.to(world.device))
            tape.done()
            loss_ref.backward()
            # sfplus draws sigma_lin = 1 - u per block; the reference's grid index i is sigma_lin = 1 - i / 1000
            sf_noise = ReplayNoise([], [], [], world.device)
            sf_noise.rand_q = [v.double() / 1000 for v in _block_values(idx)] + ([torch.zeros(B)] if tf else [])
            sf_noise.batch = B
            module = SimpleNamespace(causal=BlockCausal(3), train_shift=5.0, model=net, teacher_forcing=tf,
                                     noise_augmentation_max_timestep=0, device=world.device)
            loss_sf = DiffusionModule._causal_loss(module, sf_layout(x_clean).to(world.device),
                                                   sf_layout(eps).to(world.device), world.cond(),
                                                   as_sample_noise(sf_noise))
            sf_noise.done()
            loss_sf.backward()
            name = f"causal diffusion{' + teacher forcing' if tf else ''}, 3-frame blocks, shift 5 (as shipped + B8)"
            report_pair(name, "diffusion", loss_ref, loss_sf, grad_diff(m.generator.model, net), opts.tol,
                        exit=f"grid index per block {idx[:, ::3].tolist()}")
            del m, net


def import_with_real_diffusers(name: str):
    """Import a reference module that needs the real diffusers (its schedulers' ConfigMixin), not the bench shim."""
    import importlib

    shim = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "diffusers" or k.startswith("diffusers.")}
    sys.path.remove(SHIMS)
    try:
        return importlib.import_module(name)
    finally:
        for k in [k for k in sys.modules if k == "diffusers" or k.startswith("diffusers.")]:
            del sys.modules[k]
        sys.modules.update(shim)
        sys.path.insert(0, SHIMS)


class PromptText(torch.nn.Module):
    """Text stand-in: the negative prompt's embeddings for the negative prompt, the prompt's otherwise."""

    def __init__(self, ctx, neg, negative_prompt):
        super().__init__()
        self.ctx, self.neg, self.negative_prompt = ctx, neg, negative_prompt

    def forward(self, text_prompts):
        return {"prompt_embeds": self.neg if text_prompts[0] == self.negative_prompt else self.ctx}


def infer_teacher(ref, opts):
    """The reference's only teacher sampler, BidirectionalDiffusionInferencePipeline (Wan's UniPC, 50 steps, shift
    8, Wan-style CFG), vs sfplus's unipc_sample."""
    bdi = import_with_real_diffusers("pipeline.bidirectional_diffusion_inference")
    patch("teacher-sampler row: `pipeline.bidirectional_diffusion_inference` (and the Wan UniPC solver it imports) is "
          "imported with the installed diffusers instead of the bench shim (the solver needs diffusers' ConfigMixin)")
    world = World(ref, opts, i2v=False, causal=False, tag="teacher")
    dmd, nets = world.build_dmd(5.0)
    args = SimpleNamespace(num_train_timestep=1000, guidance_scale=5.0, negative_prompt="a negative prompt")
    vae = LatentCatcher()
    pipe = bdi.BidirectionalDiffusionInferencePipeline(
        args, world.device, generator=dmd.real_score,
        text_encoder=PromptText(world.ctx.to(world.device), world.neg.to(world.device), args.negative_prompt), vae=vae)
    g = torch.Generator().manual_seed(900)
    noise = torch.randn(world.B, world.F, world.C, world.H, world.W, generator=g)
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with torch.no_grad():
            pipe.inference(noise.to(world.device), ["a prompt"] * world.B)
    finally:
        if quiet is None:
            os.environ.pop("TQDM_DISABLE")
    with torch.no_grad():
        out = unipc_sample(nets["real"], sf_layout(noise).to(world.device), world.cond(), world.cond(neg=True),
                           num_steps=50, shift=8.0, guidance_scale=5.0)
    report("teacher sampler: BidirectionalDiffusionInferencePipeline (UniPC, 50 steps, shift 8, CFG 5) vs sfplus "
           "unipc_sample", "latents out (100 DiT calls each)", rel(vae.latents.permute(0, 2, 1, 3, 4), out), opts.tol)


GAN_BLOCKS = (13, 21, 29)  # hard-coded in the reference's WanModel classify mode


def gan(ref, opts, r_sigma: float, relativistic: bool = False):
    """DMD2's GAN term: the generator's adversarial loss and the discriminator loss with finite-difference R1 / R2
    (the reference's GAN model, num_class 1, non-saturating or relativistic), with a 30-block critic so that the
    reference's hard-coded blocks (13, 21, 29) exist. R1 uses ``r_sigma``, R2 ``2 r_sigma``: a finite difference
    divided by sigma amplifies fp32 rounding of the logits by ~1/sigma, so the judged rows use 0.5 and the shipped
    0.01 is reported. Both heads are the reference's layout (FFN 8192, register-norm weight, norm2 without affine);
    sfplus's head is built with its defaults."""
    import model.gan as mgan
    import wan.modules.model as wmodel

    wrapper_cls = ref.ww.WanDiffusionWrapper
    if not getattr(wrapper_cls, "_refcheck_gan", False):
        def adding_cls_branch(self, atten_dim=1536, num_class=4, time_embed_dim=0):
            d, heads = self.model.dim, self.model.num_heads
            self._cls_pred_branch = torch.nn.Sequential(torch.nn.LayerNorm(3 * d + (d if time_embed_dim else 0)),
                                                        torch.nn.Linear(3 * d + (d if time_embed_dim else 0), d),
                                                        torch.nn.SiLU(), torch.nn.Linear(d, num_class))
            self._register_tokens = wmodel.RegisterTokens(num_registers=3, dim=d)
            self._gan_ca_blocks = torch.nn.ModuleList(  # the FFN keeps the class's own width (8192)
                wmodel.GanAttentionBlock(dim=d, num_heads=heads) for _ in range(3))

        wrapper_cls.adding_cls_branch = adding_cls_branch
        wrapper_cls._refcheck_gan = True
    patch("B9 (GAN rows): `WanDiffusionWrapper.adding_cls_branch` replaced by a re-implementation that builds the "
          "same modules (LayerNorm -> Linear -> SiLU -> Linear, 3 `RegisterTokens`, 3 `GanAttentionBlock`s: the "
          "reference's own classes) at the critic's width and head count instead of the hard-coded 1536 / 12 heads "
          "(the blocks' FFN keeps the class default 8192, as shipped); its last Linear takes the width it is given "
          "(shipped: 1536 after a Linear to `self.dim`, which breaks every width but 1536)")
    patch("B9 (GAN rows): `GAN.num_training_frames` (read by `_run_generator`, never set by `GAN.__init__`) = 21; for "
          "`critic_loss` `_run_generator` returns a 5th value (None) since the critic unpacks 5 (it returns 4); the "
          "generator loss gets a copy of the conditioning (it doubles `prompt_embeds` in place); R1 and R2 weights "
          "are > 0 (with `r2_weight = 0` the shipped code reads `r2_loss` before assignment)")
    o = SimpleNamespace(**vars(opts))
    world = World(ref, o, i2v=False, causal=False, tag="gan", layers=max(30, SIZES[opts.size]["num_layers"]))
    B, F_ = world.B, world.F
    shape = [B, F_, world.C, world.H, world.W]
    steps = warp_timesteps([1000, 750, 500, 250], 5.0)
    g0 = torch.Generator().manual_seed(1000)
    x_real = torch.randn(*shape, generator=g0)
    extra = dict(num_class=1, relativistic_discriminator=relativistic, gan_g_weight=1e-2, gan_d_weight=1e-2,
                 r1_weight=0.5, r2_weight=0.25, r1_sigma=r_sigma, r2_sigma=2 * r_sigma)

    def after_init(model):
        model.num_training_frames = 21

    for exit_index, t_raw in cases(opts):
        t_raw = torch.tensor(t_raw[:B]).view(B, 1)
        for kind in ("generator", "critic"):
            model, nets = world.build_dmd(5.0, cls=mgan.GAN, after_init=after_init, **extra)
            align_score_grids(model)
            fs = model.fake_score
            with torch.no_grad():  # perturb the head (no unit norms, no zero heads), as the nets' weights
                gp = torch.Generator().manual_seed(1001)
                for _name, p in [*fs._cls_pred_branch.named_parameters(), *fs._gan_ca_blocks.named_parameters(),
                                *fs._register_tokens.named_parameters()]:
                    p.add_(0.05 * torch.randn(p.shape, generator=gp).to(p.device) *
                           (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))
            pairs = {"register_tokens": fs._register_tokens.register_tokens,
                     "register_norm.weight": fs._register_tokens.rms_norm.weight}
            for i, blk in enumerate(fs._gan_ca_blocks):
                for k, p in blk.named_parameters():
                    pairs[f"gan_blocks.{i}.{k.replace('cross_attn.', '')}"] = p
            for k, p in fs._cls_pred_branch.named_parameters():
                pairs[f"cls_pred_branch.{k}"] = p
            d = world.cfg.dim
            head = DiscriminatorHead(d, world.cfg.num_heads, 3)  # sfplus's defaults: the reference's layout
            head.load_state_dict({k: v.detach().cpu() for k, v in pairs.items()})  # strict: the same parameters
            head = head.to(world.device)
            normals = world.normals(exit_index + 2 + (1 if kind == "generator" else 2), seed=1010 + exit_index)
            # the reference's generator step draws fresh noise for the real latents: sfplus draws it too when
            # relativistic (it uses D(real)), and skips it otherwise (the reference's D(real) is then unused)
            sf_normals = normals[:-1] if kind == "generator" and not relativistic else normals
            tape = Tape(normals, [torch.tensor([F_ // 3]), torch.tensor([exit_index]), t_raw])
            sf_noise = ReplayNoise(sf_normals, [t_raw], [exit_index], world.device)
            sf_noise.batch = B
            g = as_sample_noise(sf_noise)
            rollout = BidirectionalRollout(steps, ExitSteps(4), [world.C, F_, world.H, world.W])
            ref_cond = {"prompt_embeds": world.ctx.to(world.device)}
            cond = world.cond()
            real = sf_layout(x_real).to(world.device)
            with replay(tape), cuda_calls_are_noops(world.device):
                if kind == "generator":
                    loss_ref = model.generator_loss(shape, dict(ref_cond), None, x_real.to(world.device))
                    parts_ref = {}
                else:
                    shipped = model._run_generator
                    model._run_generator = lambda *a, _f=shipped, **k: (*_f(*a, **k), None)
                    (ld, r1, r2), _ = model.critic_loss(shape, ref_cond, None, None, x_real.to(world.device))
                    loss_ref = ld + 0.5 * (r1 + r2)
                    parts_ref = {"loss_d": ld, "r1": r1 / extra["r1_weight"], "r2": r2 / extra["r2_weight"]}
            tape.done()
            loss_ref.backward()
            if kind == "generator":
                ro = rollout(nets["gen"], cond, g, sf_noise, kind="gen", grad=True)
                t = score_timesteps_from_raw(g.randint(0, 1000), F_, shift=5.0).to(world.device)
                loss_sf, logs = gan_generator_term(nets["fake"], head, ro.x0, t, g.randn_like(ro.x0), cond,
                                                   GAN_BLOCKS, x_real=real, gan_g_weight=extra["gan_g_weight"],
                                                   relativistic=relativistic, generator=g)
            else:
                with torch.no_grad():
                    ro = rollout(nets["gen"], cond, g, sf_noise, kind="critic", grad=False)
                t = score_timesteps_from_raw(g.randint(0, 1000), F_, shift=5.0).to(world.device)
                loss_sf, logs = gan_critic_loss(nets["fake"], head, real, ro.x0.detach(), t, g.randn_like(ro.x0),
                                                cond, GAN_BLOCKS, gan_d_weight=extra["gan_d_weight"],
                                                relativistic=relativistic, r1_weight=extra["r1_weight"],
                                                r2_weight=extra["r2_weight"], r1_sigma=extra["r1_sigma"],
                                                r2_sigma=extra["r2_sigma"], generator=g)
            sf_noise.done()
            loss_sf.backward()
            name = (f"DMD2 GAN term{' (relativistic)' if relativistic else ''}, bidirectional T2V, 30-block critic, "
                    f"blocks (13, 21, 29), R1/R2 sigma {r_sigma:g}/{2 * r_sigma:g} (aligned + B9)")
            tol = opts.tol if r_sigma >= 0.1 else float("inf")
            # R1 / R2 divide a difference of fp32 logits by sigma (and square it): rounding is amplified, so the
            # penalty parts and the critic-side gradients (dominated by them) are judged at 10x the tolerance
            tol_fd = 10 * tol
            what = "generator adversarial term" if kind == "generator" else "discriminator loss L_D + (R1 + R2)/2"
            why = {} if r_sigma >= 0.1 else {"why": "finite-difference rounding"}
            report(name, what, abs(float(loss_ref) - float(loss_sf)) / abs(float(loss_ref)), tol,
                   exit=exit_index, t_raw=t_raw.flatten().tolist(), ref=float(loss_ref), sfplus=float(loss_sf), **why)
            for k, v in parts_ref.items():
                report(name, f"  {k}", abs(float(v) - float(logs[k])) / abs(float(v)), tol if k == "loss_d" else tol_fd,
                       exit=exit_index, **why)
            if kind == "generator":
                gd = grad_diff(model.generator.model, nets["gen"])
                report(name, f"generator gradients ({gd['grad_params']} tensors, worst {gd['grad_worst_param']} "
                       f"{gd['grad_worst']:.1e})", gd["grad_rel"], tol, exit=exit_index, **why)
            else:
                gd = grad_diff(model.fake_score.model, nets["fake"])
                report(name, f"critic trunk gradients ({gd['grad_params']} tensors, worst {gd['grad_worst_param']} "
                       f"{gd['grad_worst']:.1e})", gd["grad_rel"], tol_fd, exit=exit_index, **why)
                sf_p = dict(head.named_parameters())
                num = den = 0.0
                worst, worst_name = 0.0, ""
                for k, p in pairs.items():
                    a, b = p.grad.double().cpu(), sf_p[k].grad.double().cpu()
                    num, den = num + (a - b).pow(2).sum().item(), den + a.pow(2).sum().item()
                    if rel(a, b) > worst:
                        worst, worst_name = rel(a, b), k
                report(name, f"discriminator head gradients ({len(pairs)} tensors, worst {worst_name} {worst:.1e})",
                       math.sqrt(num / den), tol_fd, exit=exit_index, **why)
            del model, nets, head


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="*", default=[])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--latent", default=None,
                    help="latent frames x height x width (the reference needs 21 frames; default 21x4x4 small, "
                         "21x16x16 at 1.3b)")
    ap.add_argument("--cases", type=int, default=2, choices=(1, 2), help="(exit, t) cases per training row")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--exit", type=int, default=None)
    ap.add_argument("--tol", type=float, default=None, help="relative tolerance (default 1e-5 fp32 CPU, 1e-4 GPU)")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv)
    opts.latent = tuple(int(v) for v in (opts.latent or ("21x4x4" if opts.size == "small" else "21x16x16"))
                        .lower().split("x"))
    if opts.tol is None:
        opts.tol = 1e-5 if opts.device == "cpu" else 1e-4
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = import_reference()
    table = {
        "bidir_t2v": lambda: bidirectional_dmd(ref, opts, i2v=False),
        "bidir_i2v": lambda: bidirectional_dmd(ref, opts, i2v=True),
        "causal": lambda: causal_dmd(ref, opts),
        "infer_bidir": lambda: infer_bidirectional(ref, opts),
        "infer_causal": lambda: infer_causal(ref, opts),
        "sid": lambda: sid(ref, opts),
        "causvid": lambda: causvid(ref, opts),
        "ode": lambda: ode_regression(ref, opts),
        "diffusion": lambda: causal_diffusion(ref, opts),
        "gan": lambda: (gan(ref, opts, 0.5), gan(ref, opts, 0.01), gan(ref, opts, 0.5, relativistic=True)),
        "infer_teacher": lambda: infer_teacher(ref, opts),
    }
    rows = opts.rows or list(table)
    t0 = time.time()
    for r in rows:
        table[r]()
    print("\nrun-time patches of the reference:")
    for p in PATCHES:
        print(" -", p)
    bad = [r for r in RESULTS if not r["ok"]]
    print(f"\n{len(RESULTS)} rows, {len(bad)} over tolerance, {time.time() - t0:.0f} s")
    print("\n| recipe | quantity | relative difference | tolerance |\n|---|---|---|---|")
    for r in RESULTS:
        tol = f"reported ({r.get('why', 'known reference bug')})" if r["tol"] == float("inf") else f"{r['tol']:g}"
        case = f" (exit {r['exit']}, t_raw {r['t_raw']})" if "t_raw" in r else ""
        print(f"| {r['recipe']} | {r['quantity']}{case} | {r['rel_diff']:.1e} | {tol} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(results=RESULTS, patches=PATCHES, argv=sys.argv[1:], torch=torch.__version__,
                           device=str(opts.device)), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
