"""The built-in toy task: synthetic moving-shape videos (:mod:`sfplus.toy.videos`), their metrics
(:mod:`sfplus.toy.metrics`) and ``sfplus toy-eval`` (:mod:`sfplus.toy.evaluation`).

One import path for recipes and callbacks::

    from sfplus.toy import ToyVideoSpec, ToyVideoDataset, toy_metrics
"""

from sfplus.toy.metrics import (
    detect,
    detect_batch,
    frechet_distance,
    prompt_accuracy,
    sharpness,
    sharpness_terms,
    toy_features,
    toy_metrics,
)
from sfplus.toy.videos import (
    DIRECTIONS,
    PALETTE,
    SHAPES,
    ToySpecError,
    ToyVideoDataset,
    ToyVideoSpec,
    make_toy_batch,
    make_toy_sample,
    parse_toy_prompt,
    render_toy_video,
    shape_mask,
    toy_prompt,
    toy_prompts,
)

__all__ = [
    "DIRECTIONS",
    "PALETTE",
    "SHAPES",
    "ToySpecError",
    "ToyVideoDataset",
    "ToyVideoSpec",
    "detect",
    "detect_batch",
    "frechet_distance",
    "make_toy_batch",
    "make_toy_sample",
    "parse_toy_prompt",
    "prompt_accuracy",
    "render_toy_video",
    "shape_mask",
    "sharpness",
    "sharpness_terms",
    "toy_features",
    "toy_metrics",
    "toy_prompt",
    "toy_prompts",
]
