"""Training rollouts: the generator samples its own videos, with a gradient through the chosen exit step.

* :mod:`~sfplus.rollout.bidirectional` — :class:`Rollout` (the one return type) and the bidirectional few-step rollout;
* :mod:`~sfplus.rollout.causal` — the Self-Forcing rollout block by block through the KV cache, and the public block
  runner (:func:`run_causal_blocks`, :func:`prepare_causal_generation`) that streaming inference shares.
"""

from sfplus.rollout.bidirectional import Rollout, bidirectional_rollout
from sfplus.rollout.causal import (
    BlockLayout,
    CallCounter,
    CausalLayoutError,
    CausalRollout,
    block_cond,
    block_layout,
    causal_rollout,
    new_kv_cache,
    prepare_causal_generation,
    run_causal_blocks,
)

__all__ = [
    "BlockLayout",
    "CallCounter",
    "CausalLayoutError",
    "CausalRollout",
    "Rollout",
    "bidirectional_rollout",
    "block_cond",
    "block_layout",
    "causal_rollout",
    "new_kv_cache",
    "prepare_causal_generation",
    "run_causal_blocks",
]
