"""Inference samplers over flow-predicting nets.

* :mod:`~sfplus.sampling.samplers` — the distilled generators' few-step sampler and the teacher's Euler solver (CFG);
* :mod:`~sfplus.sampling.unipc` — Wan's UniPC multistep solver for teachers;
* :mod:`~sfplus.sampling.streaming` — causal generation block by block through the KV cache, decoded as it goes;
* :mod:`~sfplus.sampling.causal_diffusion` — many-step autoregressive sampling of a causal diffusion model.
"""

from sfplus.sampling.causal_diffusion import causal_diffusion_sample
from sfplus.sampling.samplers import euler_cfg_states, euler_sigmas, few_step_sample, teacher_sample
from sfplus.sampling.streaming import causal_generate, causal_sample, stream_video
from sfplus.sampling.unipc import FlowUniPC, unipc_sample, unipc_sigmas

__all__ = [
    "FlowUniPC",
    "causal_diffusion_sample",
    "causal_generate",
    "causal_sample",
    "euler_cfg_states",
    "euler_sigmas",
    "few_step_sample",
    "stream_video",
    "teacher_sample",
    "unipc_sample",
    "unipc_sigmas",
]
