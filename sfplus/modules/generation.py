"""Generation from a recipe module: ``predict_step`` (batch generation, sharded or not, resumable), the sample videos
of :class:`~sfplus.callbacks.SampleLogger` and the frames ``sfplus serve`` streams — one path for all three.

:class:`Generation` is mixed into :class:`~sfplus.modules.base.RecipeModule`; it reads what each recipe defines
(``video_shape``, ``predict_seed``, ``sample``, ``sampler_description``, ``sample_weights``; the
:class:`~sfplus.modules.contract.VideoSource` protocol) and the conditioner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from sfplus.conditioning.conditioner import Cond
from sfplus.modules.contract import OutputIndex
from sfplus.nets.presets import get_config
from sfplus.noise import SampleNoise, stable_seed
from sfplus.parallel import is_sharded
from sfplus.sampling.streaming import stream_video


def sample_seed(base_seed: int, index: int, sample: int) -> int:
    """Seed of one generated video: a function of (base seed, prompt index, sample index) only."""
    return stable_seed("sample", base_seed, index, sample)


def to_uint8_video(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] → uint8 [B, T, H, W, 3]."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).contiguous()


class Generation:
    """Image conditioning, per-video noise, predict_step, sample videos and streaming (see the module docstring)."""

    # ---- image-to-video -----------------------------------------------------------------------------------------
    @property
    def is_i2v(self) -> bool:
        """Whether the DiT takes image conditioning (an I2V preset: CLIP features and the ``y`` channels)."""
        return get_config(self.net_name, **self.net_overrides).image_dim is not None

    def image_condition(self, batch: dict, rows: list[int] | None = None) -> Cond | None:
        """I2V cond entries ``{"clip_fea", "y"}`` for the batch's first frames, or None for a text-to-video net.

        Images come from ``first_frame`` (latent shards) or ``image`` (ImagePromptDataModule), [B, 3, H, W] in
        [-1, 1]; ``rows`` picks some of them. Text-to-video nets ignore images (shards store first frames by default).
        """
        if not self.is_i2v:
            return None
        images = batch.get("first_frame", batch.get("image"))
        if images is None:
            raise KeyError(f"the image-to-video net {self.net_name!r} needs first frames: the batch has neither "
                           "'first_frame' (LatentShardDataModule) nor 'image' (ImagePromptDataModule)")
        if not hasattr(self.conditioner, "image_condition"):
            raise ValueError(f"{type(self.conditioner).__name__} cannot encode images: use "
                             "sfplus.conditioning.WanConditioner with i2v: true")
        if rows is not None:
            images = images[rows]
        return self.conditioner.image_condition(images.to(self.device))

    def with_image(self, batch: dict, cond: Cond, uncond: Cond | None = None) -> tuple[Cond, Cond | None]:
        """cond (and uncond) with the batch's I2V entries added (the same image for both CFG branches,
        docs/algorithms.md, 'I2V conditioning in the recipes'); unchanged for text-to-video. Training generates at
        ``video_shape``: the images must match it."""
        image = self.image_condition(batch)
        if image is None:
            return cond, uncond
        if list(image["y"].shape[2:]) != list(self.video_shape[1:]):
            raise ValueError(f"the first frames give I2V latents (F, H, W) = {tuple(image['y'].shape[2:])} but "
                             f"video_shape is {self.video_shape}: give images of {8 * self.video_shape[2]}x"
                             f"{8 * self.video_shape[3]} pixels (ImagePromptDataModule size) or change video_shape")
        return {**cond, **image}, (None if uncond is None else {**uncond, **image})

    # ---- generation -------------------------------------------------------------------------------------------
    def noise_for(
        self, index: torch.Tensor, sample: torch.Tensor, shape: Sequence[int], base_seed: int
    ) -> torch.Tensor:
        """Per-video starting noise [B, *shape], a function of (base seed, prompt index, sample index) only."""
        out = []
        for i, s in zip(index.tolist(), sample.tolist()):
            g = torch.Generator().manual_seed(sample_seed(base_seed, i, s))
            out.append(torch.randn(tuple(shape), generator=g))
        return torch.stack(out).to(self.device)

    def sample(
        self, cond: Cond, uncond: Cond, noise: torch.Tensor, generator: SampleNoise | torch.Generator
    ) -> torch.Tensor:
        raise NotImplementedError

    def sampler_description(self) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generate one video per batch item; items whose outputs already exist are skipped.

        Returns ``{"videos": uint8 [B, T, H, W, 3], "latents", "prompts", "text", "index", "sample", "seed",
        "sampler"}`` for the items generated (``index = -1`` padding items are dropped).
        """
        keep = [i for i, idx in enumerate(batch["index"].tolist()) if idx >= 0]
        callbacks = self.trainer.callbacks if self._trainer else []
        writer = next((cb for cb in callbacks if isinstance(cb, OutputIndex)), None)
        if writer is not None:
            keep = [
                i for i in keep
                if not writer.exists(batch["text"][i], int(batch["index"][i]), int(batch["sample"][i]))
            ]
        keep = self._agree_in_sequence_group(keep)
        nothing = {"videos": None, "index": torch.empty(0, dtype=torch.long)}
        if not keep and not self._generation_is_collective():
            return nothing
        # A sharded net's forward is a collective (FSDP all-gathers): a rank whose items are all padding or already
        # written still generates one (its first row) and drops it, so every rank runs the same forwards.
        rows = keep or [0]
        out = self._generate_rows(batch, rows)
        writes = self._layout is None or self._layout.sp_rank == 0  # one copy per sequence-parallel group
        return out if keep and writes else nothing

    def _agree_in_sequence_group(self, keep: list[int]) -> list[int]:
        """The items to generate as the group's first rank sees them: the ranks of a sequence-parallel group split
        one forward, so they must generate the same rows even if an output appeared between their checks."""
        if self._sp_group is None:
            return keep
        box = [keep]
        dist.broadcast_object_list(box, group=self._sp_group, group_src=0)
        return box[0]

    def _generation_is_collective(self) -> bool:
        return any(is_sharded(net) for net in self.children() if hasattr(net, "blocks"))

    def _generate_rows(self, batch: dict, keep: list[int]) -> dict:
        """Generate the batch items ``keep`` (see :meth:`predict_step`)."""
        prompts = [batch["prompts"][i] for i in keep]
        index, sample = batch["index"][keep], batch["sample"][keep]
        latents, videos = self.generate(prompts, index, sample, self.predict_seed, self.image_condition(batch, keep))
        return {
            "videos": videos,
            "latents": latents.cpu(),
            "prompts": prompts,
            "text": [batch["text"][i] for i in keep],
            "index": index.cpu(),
            "sample": sample.cpu(),
            "seed": [sample_seed(self.predict_seed, i, s) for i, s in zip(index.tolist(), sample.tolist())],
            "sampler": self.sampler_description(),
        }

    # ---- which weights sample (SampleLogger: generator, EMA and teacher side by side) ------------------------------
    def sample_weights(self) -> tuple[str, ...]:
        """Names of the weights :meth:`using_weights` can switch generation to (subclasses list theirs)."""
        return ()

    @contextlib.contextmanager
    def using_weights(self, name: str, **options: Any) -> Iterator[None]:
        """Generate from the weights ``name`` (one of :meth:`sample_weights`) inside the block instead of the
        recipe's default choice; ``options`` go to that weights' sampler (e.g. the teacher's ``steps``)."""
        if name not in self.sample_weights():
            raise ValueError(f"{type(self).__name__} cannot sample from {name!r}; it has: "
                             f"{', '.join(self.sample_weights()) or 'no named weights'}")
        saved = self._weights_choice
        self._weights_choice = (name, options)
        try:
            yield
        finally:
            self._weights_choice = saved

    def weights_choice(self) -> tuple[str | None, dict[str, Any]]:
        """(name, sampler options) set by :meth:`using_weights`, or (None, {}) for the recipe's default."""
        return self._weights_choice or (None, {})

    def sample_blocks(
        self, cond: Cond, uncond: Cond, noise: torch.Tensor, generator: SampleNoise | torch.Generator
    ) -> Iterator[torch.Tensor]:
        """The sampled latents as consecutive blocks along frames, each yielded once final: a causal generator
        yields one per causal block (streaming); other samplers the whole video [B, C, F, H, W] at once."""
        yield self.sample(cond, uncond, noise, generator)

    # ---- generation -------------------------------------------------------------------------------------------
    def _generation_inputs(
        self, prompts: list[str], index: torch.Tensor, sample: torch.Tensor, base_seed: int, image: Cond | None,
    ) -> tuple[Cond, Cond, torch.Tensor, SampleNoise]:
        """(cond, uncond, starting noise [B, C, F, H, W], re-noising streams) of :meth:`generate`."""
        cond = self.conditioner.text(prompts, self.device)
        uncond = self.conditioner.negative(len(prompts), self.device)
        shape = self.video_shape
        if image is not None:
            cond, uncond = {**cond, **image}, {**uncond, **image}
            shape = [self.video_shape[0], *image["y"].shape[2:]]
        noise = self.noise_for(index, sample, shape, base_seed)
        pairs = zip(index.tolist(), sample.tolist())
        renoise = SampleNoise([stable_seed("renoise", base_seed, i, s) for i, s in pairs], self.device)
        return cond, uncond, noise, renoise

    @torch.no_grad()
    def generate_latents(
        self, prompts: list[str], index: torch.Tensor, sample: torch.Tensor, base_seed: int, image: Cond | None = None,
    ) -> torch.Tensor:
        """The latents [B, C, F, H, W] of :meth:`generate`, not decoded (so only one rank need decode)."""
        return self.sample(*self._generation_inputs(prompts, index, sample, base_seed, image))

    @torch.no_grad()
    def generate(
        self, prompts: list[str], index: torch.Tensor, sample: torch.Tensor, base_seed: int, image: Cond | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos for ``prompts``: (latents [B, C, F, H, W], uint8 videos [B, T, H, W, 3]).

        Video ``b`` depends only on its prompt (and image), ``base_seed``, ``index[b]`` and ``sample[b]``: its
        starting noise and its re-noising streams are seeded from them, so it does not depend on the batch or the
        rank it was generated in. ``image``: I2V conditioning (:meth:`image_condition`); the video then takes the
        image's size (Wan's size rule), not ``video_shape``. Batch generation and the sample logger both call this.
        """
        latents = self.generate_latents(prompts, index, sample, base_seed, image)
        return latents, to_uint8_video(self.conditioner.decode(latents))

    @torch.no_grad()  # on a generator function: around each step, in whichever thread runs it
    def stream(
        self, prompts: list[str], index: torch.Tensor, sample: torch.Tensor, base_seed: int, image: Cond | None = None,
    ) -> Iterator[torch.Tensor]:
        """:meth:`generate`'s videos as uint8 frame blocks [B, T_n, H, W, 3], each yielded as soon as its latent
        block is final and decoded (the codec's streaming decoder, caches carried over): a causal generator yields
        one block per causal block, others the whole video at the end. The blocks concatenate to :meth:`generate`'s
        video (same seeds). Stopping the iteration early stops generation there (``sfplus serve`` cancels so)."""
        latent_blocks = self.sample_blocks(*self._generation_inputs(prompts, index, sample, base_seed, image))
        for pixels in stream_video(latent_blocks, self.conditioner.video_codec()):
            yield to_uint8_video(pixels)
