"""LightningModules: the recipes.

* :class:`DiffusionModule` — flow-matching training of one DiT (the toy teacher; fine-tuning).
* :class:`DistillModule` — score distillation (DMD, SiD, CausVid, + GAN term) of a teacher into a few-step
  bidirectional or causal generator, with a fake-score critic and an EMA copy.
* :class:`ODEInitModule` — ODE-regression initialisation of a causal generator from teacher trajectories.
"""

from sfplus.modules.base import RecipeModule, SingleNetModule
from sfplus.modules.diffusion import DiffusionModule
from sfplus.modules.distill import DistillModule
from sfplus.modules.generation import sample_seed, stable_seed, to_uint8_video
from sfplus.modules.ode import ODEInitModule

__all__ = ["DiffusionModule", "DistillModule", "ODEInitModule", "RecipeModule", "SingleNetModule", "sample_seed",
           "stable_seed", "to_uint8_video"]
