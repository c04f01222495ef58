"""GPU benchmark of sfplus's hot paths, mirroring the reference harness (`shared/bench/ref_baseline.py`).

    python tools/bench.py dit13b vae causal13b dit14b pipe14b train13b plan13b [--out FILE]
    python tools/bench.py dit13b --tiny --device cpu          # CPU smoke run at test sizes

Every workload prints ONE JSON line ``{name, median_s, peak_mem_gib, tflops, extra}``; a first ``env`` line says
on what it ran. Weights are random (bf16 for inference; fp32 masters + bf16 autocast for training), the text
encoder is replaced by a fixed random context [1, 512, 4096] with rows past 40 zeroed (as the reference harness).

Workloads (full sizes: latent 1x16x21x60x104 = 81 frames of 480x832, 32,760 video tokens):

* ``dit13b`` / ``dit14b`` — one bidirectional denoising step of the 1.3B / 14B DiT at t = 750.
* ``vae`` — Wan VAE decode of 21 latent frames to 81 frames 480x832.
* ``pipe14b`` — 4-step 14B T2V ``few_step_sample`` + VAE decode: 4 DiT calls (the reference runs only 3, its bug
  B2), so the row also gives the time per DiT call and the sampling/decode split.
* ``causal13b`` — causal 1.3B streaming: 7 blocks x 3 latent frames, 4 steps + a cache refresh each but the last
  (``causal_generate``; the reference also refreshes after the last block: 35 calls against 34), decoded block by
  block (``stream_video``); time to the first decoded frame and frames per second including decode; the decoded
  video of the last run is written as MP4 (``--video``, default ``$OUT/causal13b.mp4``).
* ``train13b`` — one DMD critic step and one generator step (bidirectional 1.3B generator, critic and teacher,
  fp32 teacher as the reference), activation checkpointing, fp32 master weights + bf16 autocast, AdamW, rollout
  exit fixed at the last step (the reference harness does the same). ``median_s`` = critic + generator step.
* ``plan13b`` — ``sfplus.plan.plan`` for the same set-up next to the measured peak of ``train13b`` (runs it if it
  has not run in this process).

* ``vae_sweep`` — the VAE decode under each speed setting (`VAE_SWEEP`: latent frames per decoder call,
  channels-last, fused Triton norms), each against the original frame-by-frame decode of the same latents.

Variants (flags): ``--compile [BACKEND]`` compiles every DiT block with ``torch.compile`` (dit13b, dit14b,
causal13b, train13b, train13b_causal), ``--fp8`` swaps the DiT block linears for FP8 ones (dit13b, dit14b,
causal13b); both add the first-call time and the relative difference and PSNR to the bf16 eager output of the same
call. ``--vae-chunk N``, ``--vae-channels-last`` and ``--vae-fused`` set the VAE decoder (vae, pipe14b,
causal13b). ``--sdpa cudnn|flash|efficient`` puts one attention backend first, ``--cudnn-benchmark`` lets cuDNN
autotune the VAE convolutions, ``--sdpa-probe`` times each attention backend alone on the 1.3B self-attention
shape (in the ``env`` line).

Timing: ``warmup`` untimed calls, then ``reps`` calls timed with CUDA events (wall clock on CPU), median reported.
Peak memory = ``torch.cuda.max_memory_allocated`` since the workload started (weights included), as the reference.
Achieved TFLOP/s use the FLOP formulas of docs/wan_architecture.md, 'FLOPs' (DiT) and the convolution FLOPs of the VAE
decode counted on the meta device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python tools/bench.py` from a checkout: make `sfplus` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from sfplus.flow import sample_score_timesteps, warp_timesteps  # noqa: E402
from sfplus.nets.codec import WanVAECodec  # noqa: E402
from sfplus.nets.fp8 import psnr, quantize_dit_fp8
from sfplus.nets.presets import build_dit  # noqa: E402
from sfplus.nets.vae import WanVAE  # noqa: E402
from sfplus.nets.wan import WanConfig, WanDiT  # noqa: E402
from sfplus.objectives.dmd import critic_flow_loss, dmd_generator_loss, dmd_kl_grad
from sfplus.parallel import DTYPES as dtypes
from sfplus.parallel import apply_activation_checkpointing, compile_blocks
from sfplus.plan import plan
from sfplus.rollout import bidirectional as rollout
from sfplus.rollout.causal import causal_rollout
from sfplus.sampling.samplers import few_step_sample
from sfplus.sampling.streaming import causal_generate, stream_video
from sfplus.video_io import read_mp4, write_mp4
from tools.memory_peak import trace_peak

GIB = 2**30
WORKLOADS = ("dit13b", "dit14b", "vae", "vae_sweep", "pipe14b", "causal13b", "train13b", "train13b_causal",
             "plan13b")


class BenchError(ValueError):
    """Bad benchmark input (unknown workload, option value)."""


@dataclass(frozen=True)
class Sizes:
    """Everything a workload's size depends on; `Sizes()` is the reference harness's set-up, `Sizes.tiny()` a CPU
    smoke-test version of the same code paths."""

    frames: int = 21  # latent frames (81 pixel frames)
    height: int = 60  # latent height (480 pixels)
    width: int = 104  # latent width (832 pixels)
    prompt_rows: int = 40  # non-zero rows of the fake text context (the rest is zero padding)
    small: str = "wan2.1-t2v-1.3b"  # preset of the "1.3B" workloads
    large: str = "wan2.1-t2v-14b"  # preset of the "14B" workloads
    vae: dict = field(default_factory=dict)  # WanVAE overrides ({} = the published Wan2.1 VAE)
    steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)  # unwarped few-step list
    shift: float = 5.0
    frames_per_block: int = 3
    dit_t: float = 750.0  # timestep of the single DiT step
    guidance_scale: float = 5.0  # DMD real-score CFG (reference convention)
    warmup: int = 1
    reps: int = 3
    pipe_reps: int = 2
    train_reps: int = 3
    teacher: str | None = None  # train13b's teacher preset (None: `small`, as the reference harness)
    master_dtype: str = "fp32"  # train13b's generator and critic weights (and AdamW states)
    teacher_dtype: str = "fp32"

    @property
    def teacher_preset(self) -> str:
        return self.teacher or self.small

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(frames=6, height=2, width=4, prompt_rows=4, small="tiny", large="tiny",
                   vae=dict(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1),
                   warmup=0, reps=1, pipe_reps=1, train_reps=1)

    @property
    def latent(self) -> tuple[int, int, int, int, int]:
        return (1, 16, self.frames, self.height, self.width)

    @property
    def timesteps(self) -> list[float]:
        return warp_timesteps(self.steps, self.shift)


# ---------------------------------------------------------------------------------------------------- FLOPs
def dit_flops(cfg: WanConfig, frames: int, height: int, width: int, *, kv_tokens: int | None = None,
              with_context: bool = True, image_tokens: int = 0) -> float:
    """Forward FLOPs of one WanDiT call (docs/wan_architecture.md, 'FLOPs'; multiply-add = 2).

    frames/height/width: latent size of the call's input. kv_tokens: self-attention keys per query (default: the
    call's own tokens; a KV-cache call attends to the cached frames too). with_context: count the text MLP and the
    cross-attention keys/values (a KV-cache call after the first reuses them).
    """
    pt, ph, pw = cfg.patch_size
    n = (frames // pt) * (height // ph) * (width // pw)
    k = n if kv_tokens is None else kv_tokens
    ctx = cfg.text_len + image_tokens
    d, f, layers, vol = cfg.dim, cfg.ffn_dim, cfg.num_layers, pt * ph * pw
    block = 12 * n * d * d + 4 * n * d * f + 4 * n * k * d + 4 * n * ctx * d
    if with_context:
        block += 4 * ctx * d * d
    total = layers * block + 2 * n * (vol * cfg.in_dim) * d + 2 * n * (vol * cfg.out_dim) * d
    if with_context:
        total += 2 * cfg.text_len * (cfg.text_dim * d + d * d)
    return float(total)


def causal_flops(cfg: WanConfig, sizes: Sizes) -> float:
    """FLOPs of causal streaming: per block (steps + 1 refresh) calls on its frames, attending to all earlier
    frames plus itself; cross-attention keys/values and the text MLP only on the very first call (then cached)."""
    fpb, calls_per_block = sizes.frames_per_block, len(sizes.steps) + 1
    tokens_per_frame = (sizes.height // cfg.patch_size[1]) * (sizes.width // cfg.patch_size[2])
    total, first = 0.0, True
    for start in range(0, sizes.frames, fpb):
        keys = (start + fpb) * tokens_per_frame
        for _ in range(calls_per_block):
            total += dit_flops(cfg, fpb, sizes.height, sizes.width, kv_tokens=keys, with_context=first)
            first = False
    return total


@functools.lru_cache(maxsize=8)
def vae_decode_flops(vae_overrides: tuple, latent: tuple[int, ...]) -> float:
    """Convolution (+ attention) FLOPs of `WanVAE.decode`, counted by running it on the meta device (no memory,
    no compute): docs/wan_architecture.md, 'FLOPs' gives 2.75e14 for 21x60x104 latents."""
    with torch.device("meta"):
        vae = WanVAE(**dict(vae_overrides)).to(torch.bfloat16)
        z = torch.empty(latent, dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(z)
    return float(counter.get_total_flops())


# (chunk_frames, channels_last) of the `vae_sweep` workload; the first is the original frame by frame.
VAE_SWEEP = ((1, False, False), (4, False, False), (4, True, False), (4, True, True), (8, True, True))


def configure_vae(vae: WanVAE, chunk_frames: int = 4, channels_last: bool = False, fused_norms: bool = False) -> WanVAE:
    """Set the decoder's speed options on a built WanVAE (all keep the results; see `WanVAE`). `fused_norms`
    matters on CUDA with channels-last only (the Triton norm → conv path, `sfplus.nets.row_norm`)."""
    vae.decode_chunk_frames = chunk_frames
    if vae.channels_last != channels_last:
        vae.use_channels_last(channels_last)
    vae.use_fused_norms(fused_norms)
    return vae


def _vae_flops(sizes: Sizes) -> float:
    return vae_decode_flops(tuple(sorted(sizes.vae.items())), sizes.latent)


# ---------------------------------------------------------------------------------------------------- plumbing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], dict | None], device: torch.device, warmup: int, reps: int) -> tuple[float, list, dict]:
    """Median seconds of `fn` over `reps` timed calls after `warmup` untimed ones (CUDA events on GPU).

    `fn` may return a dict of extra per-call measurements (seconds); their medians come back as the third value.
    """
    if reps < 1:
        raise BenchError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times, extras = [], []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            extra = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            extra = fn()
            times.append(time.perf_counter() - t0)
        extras.append(extra if isinstance(extra, dict) else {})
    medians = {k: statistics.median(e[k] for e in extras) for k in extras[0]} if extras[0] else {}
    if PROFILE_TOP and device.type == "cuda":
        _print_profile(fn, PROFILE_TOP)
    return statistics.median(times), times, medians


PROFILE_TOP = 0  # --profile N: after timing, one more call under torch.profiler; print its N costliest kernels


def _print_profile(fn: Callable[[], object], top: int) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)
    print(f"# profile (one call, top {top} kernels by CUDA time)\n{table}", flush=True)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def _reserved_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_reserved(device) / GIB, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def row(name: str, median: float | None, peak: float | None, flops: float | None, /, **extra) -> dict:
    """One result line: achieved TFLOP/s = flops / median."""
    tflops = None if (flops is None or not median) else round(flops / median / 1e12, 1)
    return dict(name=name, median_s=None if median is None else round(median, 4), peak_mem_gib=peak, tflops=tflops,
                extra=extra)


class Bench:
    """Runs workloads on one device, keeping the built nets that the next workload can reuse."""

    def __init__(self, sizes: Sizes, device: torch.device | str, video_path: str | None = None,
                 compile_backend: str | None = None, fp8: bool = False, vae_options: dict | None = None,
                 memory_trace: int = 0) -> None:
        self.sizes, self.device = sizes, torch.device(device)
        self.video_path = video_path
        self.compile_backend = compile_backend  # torch.compile the DiT blocks with this backend
        self.fp8 = fp8  # FP8 linears in the DiT blocks (inference workloads)
        self.vae_options = dict(vae_options or {})  # chunk_frames, channels_last, fused_norms
        self.memory_trace = memory_trace  # > 0: allocator trace of the training steps, top sites
        self.results: dict[str, dict] = {}
        self._nets: dict[str, torch.nn.Module] = {}

    # ---- built nets -------------------------------------------------------------------------------------------
    def keep(self, *names: str) -> None:
        """Free every cached net not named (so a workload's peak memory counts only its own nets)."""
        for name in [n for n in self._nets if n not in names]:
            del self._nets[name]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _build(self, key: str, make: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
        if key not in self._nets:
            torch.manual_seed(0)
            old = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # build straight in bf16: no fp32 copy of a 14B net
            try:
                with self.device:
                    net = make()
            finally:
                torch.set_default_dtype(old)
            self._nets[key] = net.eval().requires_grad_(False)
        return self._nets[key]

    def dit(self, preset: str) -> WanDiT:
        return self._build(f"dit:{preset}", lambda: build_dit(preset), torch.bfloat16)

    def vae(self) -> WanVAE:
        vae = self._build("vae", lambda: WanVAE(**self.sizes.vae), torch.bfloat16)
        return configure_vae(vae, **self.vae_options)

    def context(self, cfg: WanConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
        """Fake text features [1, text_len, text_dim]: random rows, zero past `prompt_rows` (padding)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=self.device, generator=g, dtype=torch.float32)
        ctx[:, self.sizes.prompt_rows:] = 0
        return ctx.to(dtype)

    def noise(self, dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(self.sizes.latent, device=self.device, generator=g, dtype=torch.float32).to(dtype)

    def generator(self, seed: int = 2) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    # ---- workloads --------------------------------------------------------------------------------------------
    def run(self, name: str) -> dict:
        if name not in WORKLOADS:
            raise BenchError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        try:
            result = getattr(self, f"_w_{name}")()
        except Exception as err:
            self.results[name] = dict(name=name, error=repr(err)[:800])
            raise
        self.results[name] = result
        return result

    def _dit_step(self, preset: str, name: str) -> dict:
        s, dev = self.sizes, self.device
        self.keep(f"dit:{preset}")
        _reset_peak(dev)
        net = self.dit(preset)
        x = self.noise()
        t = torch.full((1, s.frames), s.dit_t, device=dev)
        ctx = self.context(net.config)

        out = {}

        def step():
            with torch.no_grad():
                out["y"] = net(x, t, ctx)

        extra = self._transform(f"dit:{preset}", net, step, out)
        med, runs, _ = measure(step, dev, s.warmup, s.reps)
        extra.update(self._fidelity(out))
        flops = dit_flops(net.config, s.frames, s.height, s.width)
        return row(name, med, _peak_gib(dev), flops, runs_s=_r(runs), flops=flops, shape="x".join(map(str, s.latent)),
                   params=net.num_parameters(), **extra)

    def _transform(self, key: str, net: WanDiT, step: Callable[[], None], out: dict) -> dict:
        """Apply the variant flags to `net` in place: `--fp8` swaps the block linears for FP8 ones, `--compile`
        compiles every block (Inductor fuses the fp32 norm / modulation / RoPE / gate chains around the matmuls and
        attention; shapes that change between calls, as the KV-cache lengths, make it dynamic after one
        recompile). Runs `step` once before (the bf16 eager reference output, kept in ``out["eager"]``) and once
        after (compilation, timed apart from the measurement)."""
        if not (self.fp8 or self.compile_backend):
            return {}
        step()
        out["eager"] = out["y"]
        extra: dict = {}
        if self.fp8:
            extra["fp8_linears"] = quantize_dit_fp8(net)
        if self.compile_backend:
            for block in net.blocks:
                block.compile(backend=self.compile_backend)
            extra["compile_backend"] = self.compile_backend
        self._nets.pop(key)  # changed in place: no other workload reuses it
        _sync(self.device)
        t0 = time.perf_counter()
        step()
        _sync(self.device)
        extra["first_call_s"] = round(time.perf_counter() - t0, 2)
        return extra

    @staticmethod
    def _fidelity(out: dict) -> dict:
        """The variant's output against the eager bf16 one of the same call: relative L2 and PSNR (peak-to-peak of
        the reference; for pixels in [-1, 1] that is at most 2)."""
        if "eager" not in out:
            return {}
        y, y0 = out["y"].float(), out.pop("eager").float()
        return {"rel_diff_vs_eager": float(f"{float((y - y0).norm() / y0.norm()):.3g}"),
                "psnr_vs_eager_db": round(psnr(y, y0), 2)}

    def _w_dit13b(self) -> dict:
        return self._dit_step(self.sizes.small, "dit13b")

    def _w_dit14b(self) -> dict:
        return self._dit_step(self.sizes.large, "dit14b")

    def _w_vae(self) -> dict:
        s, dev = self.sizes, self.device
        self.keep("vae")
        _reset_peak(dev)
        vae = self.vae()
        z = self.noise()
        out_shape = []

        def decode():
            with torch.no_grad():
                out_shape[:] = vae.decode(z).shape

        med, runs, _ = measure(decode, dev, s.warmup, s.reps)
        flops = _vae_flops(s)
        return row("vae", med, _peak_gib(dev), flops, runs_s=_r(runs), flops=flops, out_shape=list(out_shape))

    def _w_vae_sweep(self) -> dict:
        """The VAE decode under each speed setting, against the frame-by-frame eager decode of the same latents:
        median seconds, peak memory and the largest pixel difference per variant."""
        s, dev = self.sizes, self.device
        self.keep("vae")
        vae = self._build("vae", lambda: WanVAE(**s.vae), torch.bfloat16)
        z = self.noise()
        variants, reference = [], None
        for chunk, channels_last, fused in VAE_SWEEP:
            configure_vae(vae, chunk_frames=chunk, channels_last=channels_last, fused_norms=fused)
            _reset_peak(dev)
            out = {}

            def decode():
                with torch.no_grad():
                    out["y"] = vae.decode(z)  # noqa: B023 (timed right below, in this iteration)

            med, runs, _ = measure(decode, dev, s.warmup, s.reps)
            if reference is None:
                reference = out["y"]
            variants.append(dict(chunk_frames=chunk, channels_last=channels_last, fused_norms=fused,
                                 median_s=round(med, 4), runs_s=_r(runs), peak_mem_gib=_peak_gib(dev),
                                 max_abs_diff=float((out["y"].float() - reference.float()).abs().max())))
            print(json.dumps(dict(name="vae_sweep.variant", **variants[-1])), flush=True)
        configure_vae(vae)
        best = min(variants, key=lambda v: v["median_s"])
        flops = _vae_flops(s)
        return row("vae_sweep", best["median_s"], best["peak_mem_gib"], flops, flops=flops, best=best,
                   variants=variants)

    def _w_pipe14b(self) -> dict:
        s, dev = self.sizes, self.device
        self.keep(f"dit:{s.large}", "vae")
        _reset_peak(dev)
        net, vae = self.dit(s.large), self.vae()
        noise, cond = self.noise(), {"context": self.context(net.config)}
        calls = {"n": 0}

        def counted(*args, **kwargs):
            calls["n"] += 1
            return net(*args, **kwargs)

        def video():
            calls["n"] = 0
            t0 = time.perf_counter()
            x0 = few_step_sample(counted, noise, s.timesteps, cond, generator=self.generator())
            _sync(dev)
            t1 = time.perf_counter()
            with torch.no_grad():
                vae.decode(x0.to(torch.bfloat16))
            _sync(dev)
            return {"sample_s": t1 - t0, "decode_s": time.perf_counter() - t1}

        med, runs, parts = measure(video, dev, s.warmup, s.pipe_reps)
        cfg = net.config
        flops = len(s.steps) * dit_flops(cfg, s.frames, s.height, s.width) + _vae_flops(s)
        return row("pipe14b", med, _peak_gib(dev), flops, runs_s=_r(runs), dit_calls=calls["n"],
                   s_per_dit_call=round(parts["sample_s"] / calls["n"], 4), sample_s=round(parts["sample_s"], 4),
                   decode_s=round(parts["decode_s"], 4), flops=flops,
                   note="few_step_sample (every step runs) + WanVAE.decode; host syncs between the two phases")

    def _w_causal13b(self) -> dict:
        s, dev = self.sizes, self.device
        self.keep(f"dit:{s.small}", "vae")
        _reset_peak(dev)
        net, codec = self.dit(s.small), WanVAECodec(self.vae())
        noise, cond = self.noise(), {"context": self.context(net.config)}
        last: list[torch.Tensor] = []

        def stream():
            t0 = time.perf_counter()
            first = None
            blocks = causal_generate(net, noise, s.timesteps, cond, frames_per_block=s.frames_per_block,
                                     generator=self.generator())
            pixels = []
            for frames in stream_video(blocks, codec):
                pixels.append(frames)
                if first is None:  # a viewer would show these now: wait until they exist
                    _sync(dev)
                    first = time.perf_counter() - t0
            _sync(dev)
            last[:] = pixels
            return {"first_frame_s": first, "wall_s": time.perf_counter() - t0}

        def video():
            stream()
            out["y"] = torch.cat(last, dim=2)

        out: dict = {}
        variant = self._transform(f"dit:{s.small}", net, video, out)
        med, runs, parts = measure(stream, dev, s.warmup, s.reps)
        out["y"] = torch.cat(last, dim=2)
        variant.update(self._fidelity(out))
        n_frames = sum(p.shape[2] for p in last)
        flops = causal_flops(net.config, s) + _vae_flops(s)
        extra = dict(runs_s=_r(runs), first_frame_s=round(parts["first_frame_s"], 4), frames=n_frames,
                     fps=round(n_frames / med, 2), blocks=len(last), dit_calls=(s.frames // s.frames_per_block)
                     * (len(s.steps) + 1) - 1, flops=flops, vae=dict(self.vae_options), **variant)
        video = torch.cat(last, dim=2)
        del last[:]
        extra.update(self._write_video(video))
        return row("causal13b", med, _peak_gib(dev), flops, **extra)

    def _write_video(self, video: torch.Tensor) -> dict:
        """Write [1, 3, T, H, W] in [-1, 1] as MP4 at `self.video_path` (a half-size copy if the full one is over
        15 MiB, so it can come back from the GPU machine); read it back to check the frame count."""
        if not self.video_path:
            return {"mp4": None}
        try:
            frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            frames = frames.permute(1, 2, 3, 0).cpu().numpy()  # [T, H, W, 3]
            path = Path(self.video_path)
            write_mp4(path, frames, fps=16)
            info = {"mp4": str(path), "mp4_bytes": path.stat().st_size}
            if path.stat().st_size > 15 * 2**20:  # keep the full-size file out of the folder that comes back
                full = Path(tempfile.gettempdir()) / (path.stem + "_full" + path.suffix)
                shutil.move(path, full)
                write_mp4(path, frames[:, ::2, ::2], fps=16)
                info.update(mp4_full=str(full), mp4_bytes=path.stat().st_size, mp4_note="half-size copy")
            back = read_mp4(path)
            info.update(mp4_frames=int(back.shape[0]), mp4_hw=list(back.shape[1:3]),
                        pixel_mean=round(float(frames.mean()), 2), pixel_std=round(float(frames.std()), 2))
            return info
        except Exception as err:  # the timing row stays useful without the video
            return {"mp4": None, "mp4_error": repr(err)[:300]}

    def _w_train13b_causal(self) -> dict:
        """The Self-Forcing iteration: a causal 1.3B generator rolled out block by block with the KV cache."""
        return self._w_train13b(causal=True)

    def _w_train13b(self, causal: bool = False) -> dict:
        s, dev = self.sizes, self.device
        self.keep()
        _reset_peak(dev)
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        try:
            with dev:  # master weights in master_dtype (fp32 = the reference), built straight in their dtype
                torch.set_default_dtype(dtypes[s.master_dtype])
                generator, critic = (build_dit(s.small) for _ in range(2))
                torch.set_default_dtype(dtypes[s.teacher_dtype])
                teacher = build_dit(s.teacher_preset)
        finally:
            torch.set_default_dtype(old)
        if self.compile_backend:  # what `scale: {compile: true}` does: compile the blocks, then checkpoint them
            for net in (generator, critic, teacher):
                compile_blocks(net, backend=self.compile_backend)
        for net in (generator, critic):
            apply_activation_checkpointing(net.train())
        teacher.eval().requires_grad_(False)
        g_opt = torch.optim.AdamW(generator.parameters(), lr=2e-6, betas=(0.0, 0.999), weight_decay=0.01)
        c_opt = torch.optim.AdamW(critic.parameters(), lr=4e-7, betas=(0.0, 0.999), weight_decay=0.01)
        cfg = generator.config
        cond = {"context": self.context(cfg, torch.float32, seed=0)}
        uncond = {"context": self.context(cfg, torch.float32, seed=3)}
        rng = self.generator(seed=4)
        exit_index = len(s.steps) - 1  # fixed at the last step, as the reference harness
        losses = {}

        def bidirectional_rollout(net, noise, timesteps, cond, exit_index, rng, grad):
            if not causal:
                return rollout.bidirectional_rollout(net, noise, timesteps, cond, exit_index, rng, grad=grad)
            fpb = 3 if noise.shape[2] % 3 == 0 else 1
            return causal_rollout(net, noise, timesteps, cond, frames_per_block=fpb, exit_indices=exit_index,
                                  generator=rng, grad=grad)

        def score_inputs(x):
            t = sample_score_timesteps(1, s.frames, generator=torch.Generator().manual_seed(5), shift=s.shift,
                                       device=dev)
            eps = torch.randn(x.shape, device=dev, generator=rng)
            return t, eps

        def critic_step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    x = bidirectional_rollout(generator, self.noise(torch.float32), s.timesteps, cond, exit_index,
                                              rng, grad=False).x0
                t, eps = score_inputs(x)
                loss = critic_flow_loss(critic, x, t, eps, cond)
            loss.backward()
            losses["critic_grad_norm"] = torch.nn.utils.clip_grad_norm_(critic.parameters(), 10.0)
            c_opt.step()
            c_opt.zero_grad(set_to_none=True)  # as training does: no gradients held through the other net's step
            losses["critic"] = loss.detach()

        def generator_step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                x = bidirectional_rollout(generator, self.noise(torch.float32), s.timesteps, cond, exit_index,
                                          rng, grad=True).x0
                t, eps = score_inputs(x)
                kl = dmd_kl_grad(x, t, eps, fake=critic, real=teacher, cond=cond, uncond=uncond,
                                 real_guidance_scale=s.guidance_scale)
                loss = dmd_generator_loss(x, kl.grad)
            loss.backward()
            losses["generator_grad_norm"] = torch.nn.utils.clip_grad_norm_(generator.parameters(), 10.0)
            g_opt.step()
            g_opt.zero_grad(set_to_none=True)
            losses["generator"] = loss.detach()

        c_med, c_runs, _ = measure(critic_step, dev, s.warmup, s.train_reps)
        c_peak = _peak_gib(dev)
        _reset_peak(dev)
        g_med, g_runs, _ = measure(generator_step, dev, s.warmup, s.train_reps)
        g_peak = _peak_gib(dev)
        traces = {}
        if self.memory_trace:  # what is alive at each step's peak (tools/memory_peak.py)
            traces = dict(critic_trace=trace_peak(critic_step, dev, self.memory_trace),
                          generator_trace=trace_peak(generator_step, dev, self.memory_trace))
        fwd = dit_flops(cfg, s.frames, s.height, s.width)
        steps = len(s.steps)
        # forward-equivalents: no-grad calls 1x, a trained call 1x forward + 1x recompute + 2x backward
        fwd_teacher = dit_flops(teacher.config, s.frames, s.height, s.width)
        c_flops, g_flops = (steps - 1 + 1 + 4) * fwd, (steps - 1 + 1 + 4) * fwd + 2 * fwd_teacher  # teacher cond+uncond
        peaks = [p for p in (c_peak, g_peak) if p is not None]
        result = row("train13b_causal" if causal else "train13b", c_med + g_med, max(peaks) if peaks else None,
                     c_flops + g_flops,
                     critic_s=round(c_med, 4), generator_s=round(g_med, 4), critic_runs_s=_r(c_runs),
                     generator_runs_s=_r(g_runs), critic_peak_gib=c_peak, generator_peak_gib=g_peak,
                     peak_reserved_gib=_reserved_gib(dev), iteration_1g5c_s=round(g_med + 5 * c_med, 3),
                     critic_tflops=round(c_flops / c_med / 1e12, 1), generator_tflops=round(g_flops / g_med / 1e12, 1),
                     losses={k: float(v) for k, v in losses.items()}, **traces,
                     note="critic: 4 no-grad rollout calls + fwd/bwd; generator: 3 no-grad + 1 grad rollout call, "
                          "critic + teacher cond/uncond (no grad), bwd; tflops count recompute and bwd = 2x fwd")
        return result  # the nets and optimizer states go with this frame; the next workload empties the cache

    def _w_plan13b(self) -> dict:
        s = self.sizes
        train = self.results.get("train13b") or self.run("train13b")
        if "error" in train:
            raise BenchError(f"plan13b compares with train13b, which failed: {train['error']}")
        estimate = plan(generator=s.small, critic=s.small, teacher=s.teacher_preset, gpus=1, gpu_memory_gib=141.0,
                        batch_size=1, latent_shape=list(s.latent[1:]), activation_checkpointing=True,
                        offload_encoders=True, ema=False, master_dtype=s.master_dtype,
                        teacher_dtype=s.teacher_dtype, overhead_gib=0.0)
        measured = train["peak_mem_gib"]
        planned = estimate.total_gib
        return row("plan13b", None, measured, None, plan_total_gib=_g(planned),
                   plan_over_measured=None if not measured else round(planned / measured, 3),
                   measured_reserved_gib=train["extra"].get("peak_reserved_gib"),
                   plan_rows_gib={n: _g(b / GIB) for n, b, _ in estimate.rows},
                   teacher=s.teacher_preset, master_dtype=s.master_dtype, teacher_dtype=s.teacher_dtype,
                   note="plan(gpus=1, no EMA, encoders offloaded, overhead 0) vs max_memory_allocated of train13b")


def _g(x: float) -> float:
    """Four significant digits (GiB values of tiny test nets are far below 0.01)."""
    return float(f"{x:.4g}")


def _r(xs) -> list[float]:
    return [round(x, 4) for x in xs]


# ---------------------------------------------------------------------------------------------------- CLI
SDPA = {"default": None, "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _sdpa_priority(name: str):
    """A context that puts one SDPA backend first (the others stay allowed as fallbacks), or nothing."""
    if SDPA[name] is None:
        return contextlib.nullcontext()
    first = getattr(SDPBackend, SDPA[name])
    rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b != first]
    return sdpa_kernel([first, *rest], set_priority=True)


def sdpa_probe(device: torch.device, tokens: int = 32760, heads: int = 12, head_dim: int = 128,
               reps: int = 10) -> dict:
    """Time each SDPA backend alone on the 1.3B DiT's self-attention shape (bf16 [1, heads, tokens, head_dim]),
    and its largest deviation from the flash result: which kernel the DiT step is bound by, and what another
    would give."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    flops = 4 * tokens * tokens * head_dim * heads
    out, ref = {}, None
    for name in ("flash", "cudnn", "efficient"):
        backend = getattr(SDPBackend, SDPA[name])
        try:
            with sdpa_kernel([backend]):
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                med, _, _ = measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, 2,
                                    reps)
            ref = y if ref is None else ref
            out[name] = dict(ms=round(med * 1e3, 3), tflops=round(flops / med / 1e12, 1),
                             max_abs_diff_vs_flash=round(float((y.float() - ref.float()).abs().max()), 5))
        except Exception as err:  # a backend that cannot take this shape/dtype on this card
            out[name] = dict(error=repr(err)[:200])
    return out


def env_row(device: torch.device, args) -> dict:
    info = dict(name="env", torch=torch.__version__, device=str(device), tag=args.tag, sdpa=args.sdpa,
                compile=args.compile, fp8=args.fp8, vae_chunk=args.vae_chunk,
                vae_channels_last=args.vae_channels_last,
                cudnn_benchmark=args.cudnn_benchmark, date=datetime.date.today().isoformat(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        if args.sdpa_probe:
            info["sdpa_probe"] = sdpa_probe(device)
    try:
        names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
        info["sdpa_priority"] = [names.get(int(b), str(b)) for b in torch._C._get_sdp_priority_order()]
    except Exception:  # private API: informational only
        pass
    return info


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="+", help=f"any of: {', '.join(WORKLOADS)}")
    parser.add_argument("--out", help="write all rows as a JSON list to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="test sizes (CPU smoke run)")
    parser.add_argument("--reps", type=int, help="timed repetitions (all workloads)")
    parser.add_argument("--video", help="MP4 of the causal13b video (default $OUT/causal13b.mp4 when OUT is set)")
    parser.add_argument("--no-video", action="store_true", help="do not write the causal13b MP4")
    parser.add_argument("--sdpa", choices=sorted(SDPA), default="default",
                        help="put this SDPA backend first (default: PyTorch's own order)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile each DiT block (dit13b, dit14b, causal13b; default backend inductor)")
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 linears in the DiT blocks (dit13b, dit14b, causal13b), PSNR against bf16")
    parser.add_argument("--vae-chunk", type=int, default=4, help="latent frames per VAE decoder call")
    parser.add_argument("--vae-channels-last", action="store_true", help="channels-last VAE convolutions")
    parser.add_argument("--vae-fused", action="store_true",
                        help="the Triton norm → conv path (channels-last on CUDA only; sfplus.nets.row_norm)")
    parser.add_argument("--teacher", help="train13b/plan13b: teacher preset (default: the 1.3B preset), e.g. "
                                          "wan2.1-t2v-14b for the 14B-teacher recipe")
    parser.add_argument("--master-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="train13b/plan13b: generator and critic weights (and AdamW states)")
    parser.add_argument("--teacher-dtype", choices=("fp32", "bf16"), default="fp32", help="train13b/plan13b")
    parser.add_argument("--tag", default="", help="label copied into the env row")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one more call and print its N costliest CUDA kernels")
    parser.add_argument("--memory-trace", type=int, default=0, metavar="N",
                        help="train13b(_causal): after timing, trace one critic and one generator step and list the "
                             "N largest allocation sites alive at each peak (tools/memory_peak.py; on the CPU: of "
                             "the step's own allocations)")
    parser.add_argument("--sdpa-probe", action="store_true",
                        help="time each SDPA backend on the 1.3B self-attention shape (GPU only)")
    args = parser.parse_args(argv)
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        parser.error(f"unknown workload(s) {bad}; known: {', '.join(WORKLOADS)}")
    global PROFILE_TOP
    PROFILE_TOP = max(0, args.profile)
    sizes = Sizes.tiny() if args.tiny else Sizes()
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny ops: threads only contend
    if args.reps is not None:
        if args.reps < 1:
            parser.error(f"--reps must be >= 1, got {args.reps}")
        sizes = dataclasses.replace(sizes, reps=args.reps, pipe_reps=args.reps, train_reps=args.reps)
    sizes = dataclasses.replace(sizes, teacher=args.teacher or None, master_dtype=args.master_dtype,
                                teacher_dtype=args.teacher_dtype)
    if args.tiny and args.teacher:
        sizes = dataclasses.replace(sizes, teacher="tiny")
    device = torch.device(args.device)
    # same global settings as the reference harness
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    video = args.video or (os.path.join(os.environ["OUT"], "causal13b.mp4") if os.environ.get("OUT") else None)
    if args.no_video:
        video = None
    fp8_workloads, compile_workloads = ("dit13b", "dit14b", "causal13b"), ("train13b", "train13b_causal")
    if args.fp8 and any(w not in fp8_workloads for w in args.workloads):
        parser.error(f"--fp8 applies to {', '.join(fp8_workloads)} only")
    if args.compile and any(w not in fp8_workloads + compile_workloads for w in args.workloads):
        parser.error(f"--compile applies to {', '.join(fp8_workloads + compile_workloads)} only")
    if args.vae_chunk < 1:
        parser.error(f"--vae-chunk must be >= 1, got {args.vae_chunk}")
    vae_options = dict(chunk_frames=args.vae_chunk, channels_last=args.vae_channels_last,
                       fused_norms=args.vae_fused)
    bench = Bench(sizes, device, video_path=video, compile_backend=args.compile, fp8=args.fp8,
                  vae_options=vae_options, memory_trace=max(0, args.memory_trace))
    with _sdpa_priority(args.sdpa):
        rows = [env_row(device, args)]
        print(json.dumps(rows[0]), flush=True)
        for name in args.workloads:
            try:
                result = bench.run(name)
            except Exception as err:  # keep going: one failing workload must not hide the others
                result = dict(name=name, error=repr(err)[:800])
                bench.keep()
            rows.append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
