"""Synthetic moving-shape videos: the built-in toy task.

Every clip shows one filled shape of one saturated colour on a plain dark background, moving in a straight
line at a constant integer speed, e.g. the prompt "a red square moving left". Integer positions keep every
pixel exactly background or exactly shape colour, so a perfect generator is perfectly crisp and the toy
metrics (``sfplus.toy.metrics``) can tell blurry, mixed or wrong outputs from good ones.

Videos are float tensors ``[3, F, H, W]`` in ``[-1, 1]`` (channels RGB), the layout the identity codec
passes straight through as a latent ``[C, F, H, W]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from torch.utils.data import Dataset

# Saturated RGB corners of the cube in [-1, 1]: far from each other and from a dark background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}

# (row, column) step per frame; rows grow downwards, so "up" decreases the row.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}

SHAPES: tuple[str, ...] = ("square", "plus", "diamond")

# Colours closer than this (L2 in [-1, 1] RGB) to each other or to the background are refused: the
# detector in toy_metrics separates foreground at half the smallest colour-to-background distance.
_MIN_COLOUR_SEPARATION = 1.0

_PROMPT_RE = re.compile(r"^an?\s+([a-z]+)\s+([a-z]+)\s+moving\s+([a-z]+)\.?$")


class ToySpecError(ValueError):
    """An invalid toy-task setting or prompt."""


def _as_name_tuple(value, field: str, known) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    names = tuple(str(v).lower() for v in value)
    if not names:
        raise ToySpecError(f"ToyVideoSpec.{field} is empty; give at least one of {sorted(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ToySpecError(f"ToyVideoSpec.{field} has unknown value(s) {unknown}; known: {sorted(known)}")
    if len(set(names)) != len(names):
        raise ToySpecError(f"ToyVideoSpec.{field} has duplicates: {list(names)}")
    return names


@dataclass(frozen=True)
class ToyVideoSpec:
    """What the toy videos look like.

    Args:
        frames: frames per clip F (>= 2, so there is motion to see).
        height, width: frame size H, W in pixels.
        colours: colour names from ``PALETTE`` that prompts may ask for.
        shapes: shape names from ``SHAPES`` ("square" is the easiest to learn; "plus", "diamond" optional).
        directions: motion directions from ``DIRECTIONS``.
        speed: pixels moved per frame. ``None`` picks the largest speed up to 2 that keeps the shape fully
            inside the frame for the whole clip (2 for 4x16x16, 1 for 8x16x16).
        size: side of the shape's bounding box in pixels.
        background: grey level of the background in [-1, 1] (all three channels).
    """

    frames: int = 4
    height: int = 16
    width: int = 16
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("square",)
    directions: tuple[str, ...] = ("left", "right", "up", "down")
    speed: int | None = None
    size: int = 5
    background: float = -1.0

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ (YAML gives lists, we keep tuples).
        set_ = object.__setattr__
        set_(self, "colours", _as_name_tuple(self.colours, "colours", PALETTE))
        set_(self, "shapes", _as_name_tuple(self.shapes, "shapes", SHAPES))
        set_(self, "directions", _as_name_tuple(self.directions, "directions", DIRECTIONS))
        for field in ("frames", "height", "width", "size"):
            if int(getattr(self, field)) != getattr(self, field) or getattr(self, field) < 1:
                raise ToySpecError(f"ToyVideoSpec.{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.frames < 2:
            raise ToySpecError(f"ToyVideoSpec.frames must be >= 2 to show motion, got {self.frames}")
        if self.size > min(self.height, self.width):
            raise ToySpecError(
                f"ToyVideoSpec.size={self.size} does not fit a {self.height}x{self.width} frame"
            )
        if not -1.0 <= float(self.background) <= 1.0:
            raise ToySpecError(f"ToyVideoSpec.background must lie in [-1, 1], got {self.background}")
        room = min(self.height, self.width) - self.size  # free pixels along the tighter axis
        fit = room // (self.frames - 1)
        if self.speed is None:
            if fit < 1:
                raise ToySpecError(
                    f"a shape of size {self.size} cannot move 1 px/frame for {self.frames} frames inside "
                    f"{self.height}x{self.width}; enlarge the frame or shorten the clip"
                )
            set_(self, "speed", min(2, fit))
        elif int(self.speed) != self.speed or self.speed < 1 or self.speed > fit:
            raise ToySpecError(
                f"ToyVideoSpec.speed={self.speed!r} must be an integer in [1, {fit}] so a size-{self.size} "
                f"shape stays inside {self.height}x{self.width} for {self.frames} frames"
            )
        self._check_colour_separation()

    def _check_colour_separation(self) -> None:
        bg = np.full(3, float(self.background))
        points = {"background": bg, **{c: np.asarray(PALETTE[c]) for c in self.colours}}
        names = list(points)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                dist = float(np.linalg.norm(points[a] - points[b]))
                if dist < _MIN_COLOUR_SEPARATION:
                    raise ToySpecError(
                        f"ToyVideoSpec colours {a!r} and {b!r} are too close (L2 {dist:.2f} < "
                        f"{_MIN_COLOUR_SEPARATION}); background={self.background}"
                    )

    @property
    def palette(self) -> torch.Tensor:
        """RGB of ``colours`` in order, ``[K, 3]`` float32."""
        return torch.tensor([PALETTE[c] for c in self.colours], dtype=torch.float32)

    @property
    def background_rgb(self) -> torch.Tensor:
        """Background RGB, ``[3]`` float32."""
        return torch.full((3,), float(self.background), dtype=torch.float32)


def shape_mask(shape: str, size: int) -> torch.Tensor:
    """Boolean ``[size, size]`` footprint of a shape (centred in its bounding box)."""
    if shape not in SHAPES:
        raise ToySpecError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    idx = torch.arange(size, dtype=torch.float32)
    centre = (size - 1) / 2
    if shape == "plus":
        thickness = max(1, size // 3)
        start = (size - thickness) // 2
        band = (idx >= start) & (idx < start + thickness)
        return band[:, None] | band[None, :]
    # diamond: L1 ball inscribed in the box
    return (idx[:, None] - centre).abs() + (idx[None, :] - centre).abs() <= centre + 1e-6


def toy_prompt(colour: str, shape: str, direction: str) -> str:
    """The prompt text for one attribute combination, e.g. ``"a red square moving left"``."""
    return f"a {colour} {shape} moving {direction}"


def toy_prompts(spec: ToyVideoSpec | None = None) -> list[str]:
    """All prompts of a spec (every colour x shape x direction), in a fixed order."""
    spec = spec or ToyVideoSpec()
    return [toy_prompt(c, s, d) for c, s, d in product(spec.colours, spec.shapes, spec.directions)]


def parse_toy_prompt(prompt: str, spec: ToyVideoSpec | None = None) -> dict[str, str]:
    """Attributes of a toy prompt: ``{"colour", "shape", "direction"}``.

    Case and surrounding spaces are ignored, a final full stop is allowed. With ``spec`` the attributes must
    also belong to that spec. Raises ``ToySpecError`` (a ValueError) naming the prompt otherwise.
    """
    if not isinstance(prompt, str):
        raise ToySpecError(f"toy prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    match = _PROMPT_RE.match(prompt.strip().lower())
    if match is None:
        raise ToySpecError(
            f"cannot parse toy prompt {prompt!r}; expected 'a <colour> <shape> moving <direction>'"
        )
    colour, shape, direction = match.groups()
    allowed = (
        (spec.colours, spec.shapes, spec.directions) if spec else (tuple(PALETTE), SHAPES, tuple(DIRECTIONS))
    )
    for kind, value, options in zip(("colour", "shape", "direction"), (colour, shape, direction), allowed):
        if value not in options:
            raise ToySpecError(f"toy prompt {prompt!r}: unknown {kind} {value!r}; expected one of {list(options)}")
    return {"colour": colour, "shape": shape, "direction": direction}


def render_toy_video(spec: ToyVideoSpec, colour: str, shape: str, direction: str, top: int, left: int) -> torch.Tensor:
    """Draw one clip: the shape's bounding box starts at (``top``, ``left``) and moves ``spec.speed`` px/frame.

    Returns ``[3, F, H, W]`` float32 in [-1, 1]. Raises ``ToySpecError`` if the shape would leave the frame.
    """
    if colour not in PALETTE or direction not in DIRECTIONS:
        raise ToySpecError(f"unknown colour {colour!r} or direction {direction!r}")
    dy, dx = DIRECTIONS[direction]
    travel = spec.speed * (spec.frames - 1)
    rows = [top, top + dy * travel]
    cols = [left, left + dx * travel]
    if min(rows) < 0 or max(rows) + spec.size > spec.height or min(cols) < 0 or max(cols) + spec.size > spec.width:
        raise ToySpecError(
            f"a {shape} of size {spec.size} starting at (top={top}, left={left}) moving {direction} at "
            f"{spec.speed} px/frame leaves the {spec.height}x{spec.width} frame"
        )
    footprint = shape_mask(shape, spec.size)
    rgb = torch.tensor(PALETTE[colour], dtype=torch.float32)
    video = torch.full((3, spec.frames, spec.height, spec.width), float(spec.background))
    for f in range(spec.frames):
        y = top + dy * spec.speed * f
        x = left + dx * spec.speed * f
        window = video[:, f, y : y + spec.size, x : x + spec.size]
        window[:, footprint] = rgb[:, None]
    return video


def make_toy_sample(
    spec: ToyVideoSpec,
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
) -> tuple[torch.Tensor, str, dict]:
    """Draw one random clip.

    Attributes not given are drawn uniformly from ``spec``; the start position is uniform over all positions
    that keep the shape inside the frame for the whole clip.

    Returns:
        video ``[3, F, H, W]`` float32 in [-1, 1], its prompt, and the attributes
        ``{"colour", "shape", "direction", "top", "left", "speed"}`` (top/left: bounding box at frame 0).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    # Draw every attribute even when it is forced, so forcing one attribute does not shift the others.
    drawn = [opts[int(rng.integers(len(opts)))] for opts in (spec.colours, spec.shapes, spec.directions)]
    colour = colour or drawn[0]
    shape = shape or drawn[1]
    direction = direction or drawn[2]
    dy, dx = DIRECTIONS[direction]
    travel = spec.speed * (spec.frames - 1)
    # Range of the start coordinate along each axis: leave `travel` pixels free on the side we move to.
    top_lo, top_hi = (travel if dy < 0 else 0), spec.height - spec.size - (travel if dy > 0 else 0)
    left_lo, left_hi = (travel if dx < 0 else 0), spec.width - spec.size - (travel if dx > 0 else 0)
    top = int(rng.integers(top_lo, top_hi + 1))
    left = int(rng.integers(left_lo, left_hi + 1))
    video = render_toy_video(spec, colour, shape, direction, top, left)
    attrs = {"colour": colour, "shape": shape, "direction": direction, "top": top, "left": left, "speed": spec.speed}
    return video, toy_prompt(colour, shape, direction), attrs


class ToyVideoDataset(Dataset):
    """A fixed-length set of toy clips, deterministic per index.

    Item ``i`` is drawn with ``np.random.default_rng([seed, i])``, so it does not depend on which other items
    were read, in which order, or in which worker.

    Returns dicts ``{"video": [3, F, H, W] float32, "prompt": str, "index": int}``.
    """

    def __init__(self, length: int, seed: int = 0, spec: ToyVideoSpec | None = None) -> None:
        if int(length) != length or length < 0:
            raise ToySpecError(f"ToyVideoDataset length must be a non-negative integer, got {length!r}")
        if int(seed) != seed or seed < 0:
            raise ToySpecError(f"ToyVideoDataset seed must be a non-negative integer, got {seed!r}")
        self.length = int(length)
        self.seed = int(seed)
        self.spec = spec or ToyVideoSpec()

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[torch.Tensor, str, dict]:
        """``make_toy_sample`` for item ``index`` (with its attributes)."""
        if not 0 <= index < self.length:
            raise IndexError(f"ToyVideoDataset index {index} out of range [0, {self.length})")
        return make_toy_sample(self.spec, np.random.default_rng([self.seed, int(index)]))

    def __getitem__(self, index: int) -> dict:
        video, prompt, _ = self.sample(index)
        return {"video": video, "prompt": prompt, "index": int(index)}


def make_toy_batch(n: int, seed: int = 0, spec: ToyVideoSpec | None = None) -> tuple[torch.Tensor, list[str]]:
    """``n`` clips of ``ToyVideoDataset(n, seed, spec)`` stacked: videos ``[n, 3, F, H, W]`` and prompts."""
    dataset = ToyVideoDataset(n, seed, spec)
    items = [dataset[i] for i in range(n)]
    if not items:
        spec = dataset.spec
        return torch.empty(0, 3, spec.frames, spec.height, spec.width), []
    return torch.stack([it["video"] for it in items]), [it["prompt"] for it in items]


__all__ = [
    "DIRECTIONS",
    "PALETTE",
    "SHAPES",
    "ToySpecError",
    "ToyVideoDataset",
    "ToyVideoSpec",
    "make_toy_batch",
    "make_toy_sample",
    "parse_toy_prompt",
    "render_toy_video",
    "shape_mask",
    "toy_prompt",
    "toy_prompts",
]
