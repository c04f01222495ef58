"""Per-sample random streams: results that do not depend on how a batch is split across ranks.

Each sample of the *global* batch draws from its own generator, seeded from (run seed, update index, purpose,
global sample index). A rank holding rows ``[r*B, (r+1)*B)`` of the global batch therefore draws exactly the noise
a single process holding the whole batch would draw for those rows: one GPU with batch 8·B and eight GPUs with
batch B train identically (up to reduction order), and a resumed run re-creates every stream from the update
index alone — no RNG state in checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, identical on every machine and process (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SampleNoise:
    """One generator per sample; draws are stacked along the batch axis.

    Args:
        seeds: one seed per local sample.
        device: where the generators (and the draws) live.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_rows(cls, *parts: Any, rows: range, device: torch.device | str = "cpu") -> SampleNoise:
        """Streams for global rows ``rows`` of a batch, seeded from ``parts`` and the row index."""
        return cls([stable_seed(*parts, row) for row in rows], device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, *shape] standard normal."""
        rows = [torch.randn(tuple(shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(rows).to(dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"noise for {len(self)} samples asked for a batch of {x.shape[0]}")
        return self.randn(x.shape[1:]).to(x.device, x.dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        """[B, *shape] uniform in [0, 1) ([B] without ``shape``); row b from sample b's own stream."""
        rows = [torch.rand(1, *shape, generator=g, device=self.device) for g in self.generators]
        return torch.cat(rows)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """[B] integers in [low, high)."""
        return torch.cat([torch.randint(low, high, (1,), generator=g, device=self.device) for g in self.generators])
