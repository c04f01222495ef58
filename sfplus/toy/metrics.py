"""Toy-task metrics: did the generator draw the prompted shape, crisply, with the real data's statistics?

Everything here is a fixed, deterministic function of pixel tensors (nothing learned), so numbers are
comparable across runs:

* ``detect`` / ``detect_batch``: a rule-based detector. Foreground = pixels far from the background colour;
  colour = palette colour nearest to the mean foreground colour; direction = sign of the dominant component of
  the foreground centroid's displacement from the first to the last frame; shape = template with the best IoU
  at the centroid.
* ``prompt_accuracy``: fraction of videos whose detected colour, direction and shape all match the prompt,
  plus each attribute alone.
* ``sharpness``: in [0, 1], single-object fraction x crispness (see ``sharpness_terms``). Blurry, averaged,
  doubled or noisy outputs score low; real toy videos score 1.
* ``toy_features`` + ``frechet_distance``: Fréchet distance between Gaussians fitted to hand-crafted features
  (palette histogram, mean colours, centroid trajectory, foreground mass and edge energy per frame, sharpness).

Videos are ``[N, 3, F, H, W]`` (a single ``[3, F, H, W]`` for ``detect``) in [-1, 1]; values outside are
clamped, as they would be when written to 8-bit video.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sfplus.toy.videos import ToySpecError, ToyVideoSpec, parse_toy_prompt, shape_mask

# Thresholds as fractions of the smallest palette-to-background distance `ref` (2.0 for the default spec):
# a pixel is foreground above FG_THRESHOLD*ref; below DEAD_ZONE*ref it counts as background (tolerates
# small generator errors); crispness compares pixels with half the colour-to-background distance.
FG_THRESHOLD = 0.5
DEAD_ZONE = 0.1
# Centroid displacements under this many pixels (first to last frame) count as "no motion".
MIN_DISPLACEMENT = 1.0
_NONE = "none"


def _check_videos(videos: torch.Tensor, name: str = "videos") -> torch.Tensor:
    if not isinstance(videos, torch.Tensor):
        raise ToySpecError(f"{name} must be a torch.Tensor [N, 3, F, H, W], got {type(videos).__name__}")
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ToySpecError(f"{name} must have shape [N, 3, F, H, W], got {list(videos.shape)}")
    if videos.shape[2] < 2:
        raise ToySpecError(f"{name} needs at least 2 frames to show motion, got shape {list(videos.shape)}")
    if not torch.isfinite(videos).all():
        raise ToySpecError(f"{name} contains NaN or inf")
    return videos.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)


class _Analysis:
    """Per-pixel and per-frame quantities shared by all metrics (computed once per batch).

    Shapes: N videos, F frames, H x W pixels, K palette colours.
    """

    def __init__(self, videos: torch.Tensor, spec: ToyVideoSpec) -> None:
        x = _check_videos(videos)
        self.x = x  # [N, 3, F, H, W]
        self.spec = spec
        n, _, f, h, w = x.shape
        bg = spec.background_rgb.view(1, 3, 1, 1, 1)
        palette = spec.palette  # [K, 3]
        self.palette = palette
        self.ref = float((palette - spec.background_rgb).norm(dim=1).min())
        self.dist_bg = (x - bg).norm(dim=1)  # [N, F, H, W]
        self.mask = self.dist_bg > FG_THRESHOLD * self.ref  # hard foreground
        # Soft foreground weight: 0 inside the dead zone, 1 at full colour-to-background distance.
        eps = DEAD_ZONE * self.ref
        self.weight = ((self.dist_bg - eps) / (self.ref - eps)).clamp(0.0, 1.0)

        count = self.mask.sum(dim=(1, 2, 3))  # [N]
        self.has_object = count > 0
        mask_f = self.mask.unsqueeze(1).float()
        mean = (x * mask_f).sum(dim=(2, 3, 4)) / count.clamp(min=1).unsqueeze(1)  # [N, 3]
        self.mean_colour = torch.where(self.has_object[:, None], mean, spec.background_rgb)
        self.colour_idx = torch.cdist(self.mean_colour, palette).argmin(dim=1)  # [N]

        self.frame_count = self.mask.sum(dim=(2, 3))  # [N, F]
        rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
        m = self.mask.float()
        denom = self.frame_count.clamp(min=1).float()
        cy = (m * rows).sum(dim=(2, 3)) / denom
        cx = (m * cols).sum(dim=(2, 3)) / denom
        self.centroid = torch.stack([cy, cx], dim=-1)  # [N, F, 2] (row, col); valid where frame_count > 0
        self.frame_has_object = self.frame_count > 0
        self._sharpness: dict[str, torch.Tensor] | None = None

    # ---- attributes -------------------------------------------------------------------------------------
    def colours(self) -> list[str]:
        pairs = zip(self.colour_idx.tolist(), self.has_object.tolist())
        return [self.spec.colours[i] if ok else _NONE for i, ok in pairs]

    def displacement(self) -> torch.Tensor:
        """Centroid displacement last - first frame, ``[N, 2]`` (row, col); NaN if either frame is empty."""
        d = self.centroid[:, -1] - self.centroid[:, 0]
        ok = self.frame_has_object[:, 0] & self.frame_has_object[:, -1]
        return torch.where(ok[:, None], d, torch.full_like(d, float("nan")))

    def directions(self) -> list[str]:
        out = []
        for dy, dx in self.displacement().tolist():
            if dy != dy or max(abs(dy), abs(dx)) < MIN_DISPLACEMENT:  # NaN or (almost) static
                out.append(_NONE)
            elif abs(dx) >= abs(dy):
                out.append("right" if dx > 0 else "left")
            else:
                out.append("down" if dy > 0 else "up")
        return out

    def shape_iou(self) -> torch.Tensor:
        """Mean over frames of the IoU between the foreground and each shape template at the centroid, ``[N, S]``."""
        n, f, h, w = self.mask.shape
        size = self.spec.size
        half = (size - 1) / 2
        # Top-left of a template centred on the centroid; empty frames get IoU 0 below.
        top = torch.round(self.centroid[..., 0] - half).long().view(n * f, 1)
        left = torch.round(self.centroid[..., 1] - half).long().view(n * f, 1)
        rel_y = torch.arange(h).view(1, h) - top  # [NF, H]
        rel_x = torch.arange(w).view(1, w) - left  # [NF, W]
        inside = ((rel_y >= 0) & (rel_y < size))[:, :, None] & ((rel_x >= 0) & (rel_x < size))[:, None, :]
        ry = rel_y.clamp(0, size - 1)[:, :, None]
        rx = rel_x.clamp(0, size - 1)[:, None, :]
        mask = self.mask.view(n * f, h, w)
        ious = []
        for shape in self.spec.shapes:
            tmpl = shape_mask(shape, size)[ry, rx] & inside  # [NF, H, W]
            inter = (tmpl & mask).sum(dim=(1, 2)).float()
            union = (tmpl | mask).sum(dim=(1, 2)).float().clamp(min=1)
            iou = torch.where(self.frame_has_object.view(-1), inter / union, torch.zeros_like(inter))
            ious.append(iou.view(n, f).mean(dim=1))
        return torch.stack(ious, dim=1)

    def shapes(self) -> list[str]:
        best = self.shape_iou().argmax(dim=1).tolist()
        return [self.spec.shapes[i] if ok else _NONE for i, ok in zip(best, self.has_object.tolist())]

    # ---- sharpness --------------------------------------------------------------------------------------
    def largest_component_fraction(self) -> torch.Tensor:
        """Per frame, soft foreground mass in the largest 8-connected component / all soft mass, ``[N, F]``."""
        n, f, h, w = self.mask.shape
        frames = n * f
        mask = self.mask.reshape(frames, 1, h, w)
        # Label propagation: every foreground pixel starts with a unique id and repeatedly takes the largest
        # id in its 3x3 neighbourhood (max-pool) while staying inside the foreground; at the fixed point each
        # 8-connected component carries one id. float64 holds the ids exactly.
        ids = torch.arange(1, frames * h * w + 1, dtype=torch.float64).view(frames, 1, h, w)
        labels = torch.where(mask, ids, torch.zeros_like(ids))
        for _ in range(h * w):
            grown = torch.where(mask, F.max_pool2d(labels, 3, stride=1, padding=1), torch.zeros_like(labels))
            if torch.equal(grown, labels):
                break
            labels = grown
        labels = labels.long().view(frames, h, w)
        weight = self.weight.reshape(frames, h, w)
        comp_mass = torch.bincount(labels.flatten(), weights=weight.flatten().double(), minlength=frames * h * w + 1)
        comp_mass = comp_mass[1:].view(frames, h * w)  # label l lives in frame (l - 1) // (h * w)
        largest = comp_mass.amax(dim=1).float()
        total = weight.sum(dim=(1, 2))
        frac = torch.where(mask.any(dim=(1, 2, 3)), largest / total.clamp(min=1e-8), torch.zeros_like(total))
        return frac.view(n, f)

    def crispness(self) -> torch.Tensor:
        """1 - mean blur error over non-background pixels, ``[N]``.

        Blur error of a pixel: its distance to the nearer of (background, detected palette colour), divided by
        half the distance between those two, clipped to 1 — 0 for a clean pixel, 1 for a half-way (blurred)
        or foreign-coloured one. Pixels inside the dead zone are background and do not count.
        """
        colour = self.palette[self.colour_idx].view(-1, 3, 1, 1, 1)  # [N, 3, 1, 1, 1]
        dist_colour = (self.x - colour).norm(dim=1)  # [N, F, H, W]
        half = (self.palette[self.colour_idx] - self.spec.background_rgb).norm(dim=1) / 2  # [N]
        err = (torch.minimum(self.dist_bg, dist_colour) / half.view(-1, 1, 1, 1)).clamp(max=1.0)
        counted = (self.dist_bg > DEAD_ZONE * self.ref).float()
        n_counted = counted.sum(dim=(1, 2, 3))
        crisp = 1.0 - (err * counted).sum(dim=(1, 2, 3)) / n_counted.clamp(min=1)
        return torch.where(self.has_object, crisp, torch.zeros_like(crisp))

    def sharpness_terms(self) -> dict[str, torch.Tensor]:
        if self._sharpness is None:  # shared by the score and the features
            single = self.largest_component_fraction().mean(dim=1)
            crisp = self.crispness()
            self._sharpness = {"single_object": single, "crispness": crisp, "sharpness": single * crisp}
        return self._sharpness

    # ---- features ---------------------------------------------------------------------------------------
    def features(self) -> torch.Tensor:
        """Fixed hand-crafted features, ``[N, K + 3 + 3 + 4F + 1]`` float64 (see ``toy_features``)."""
        n, _, f, h, w = self.x.shape
        spec = self.spec
        mask = self.mask.unsqueeze(1)  # [N, 1, F, H, W]
        # Palette histogram of the soft foreground mass (a colour histogram with the palette as bins).
        pix = self.x.permute(0, 2, 3, 4, 1).reshape(-1, 3)
        nearest = torch.cdist(pix, self.palette).argmin(dim=1).view(n, f * h * w)
        fg_weight = (self.weight * self.mask).view(n, f * h * w)
        hist = torch.zeros(n, len(spec.colours)).scatter_add_(1, nearest, fg_weight)
        hist = hist / hist.sum(dim=1, keepdim=True).clamp(min=1e-8)
        # Background colour: mean of non-foreground pixels (a shifted background is a visible error).
        bg_n = (~mask).sum(dim=(2, 3, 4)).clamp(min=1)
        bg_mean = (self.x * ~mask).sum(dim=(2, 3, 4)) / bg_n
        # Centroid trajectory in [0, 1]; empty frames sit at the centre.
        scale = torch.tensor([max(h - 1, 1), max(w - 1, 1)], dtype=torch.float32)
        traj = torch.where(self.frame_has_object[..., None], self.centroid / scale, torch.full_like(self.centroid, 0.5))
        # Foreground size per frame (soft mass, in units of the shape's bounding box).
        mass = self.weight.sum(dim=(2, 3)) / spec.size**2  # [N, F]
        # Edge energy per frame: squared gradients of the soft foreground map, 1 for a clean square's outline.
        # Squared (not absolute) differences because blur spreads a step over several pixels and keeps its
        # total variation but lowers its energy; the dead zone in `weight` keeps low-level noise out.
        gy = (self.weight[..., 1:, :] - self.weight[..., :-1, :]).square().sum(dim=(2, 3))
        gx = (self.weight[..., :, 1:] - self.weight[..., :, :-1]).square().sum(dim=(2, 3))
        edges = (gx + gy) / (4 * spec.size)  # [N, F]
        sharp = self.sharpness_terms()["sharpness"][:, None]
        feats = [hist, self.mean_colour, bg_mean, traj.reshape(n, 2 * f), mass, edges, sharp]
        return torch.cat([t.double() for t in feats], dim=1)


# ---- public API -----------------------------------------------------------------------------------------
def detect_batch(videos: torch.Tensor, spec: ToyVideoSpec | None = None) -> list[dict]:
    """Run the detector on ``[N, 3, F, H, W]`` videos; one dict per video (see ``detect``)."""
    a = _Analysis(videos, spec or ToyVideoSpec())
    colours, directions, shapes = a.colours(), a.directions(), a.shapes()
    disp = a.displacement()
    out = []
    for i in range(a.x.shape[0]):
        centroids = [
            [round(v, 3) for v in c] if ok else None
            for c, ok in zip(a.centroid[i].tolist(), a.frame_has_object[i].tolist())
        ]
        out.append(
            {
                "colour": colours[i],
                "direction": directions[i],
                "shape": shapes[i],
                "mean_colour": [round(v, 4) for v in a.mean_colour[i].tolist()],
                "centroids": centroids,
                "displacement": None if disp[i, 0].isnan() else [round(v, 3) for v in disp[i].tolist()],
                "foreground_pixels": a.frame_count[i].tolist(),
            }
        )
    return out


def detect(video: torch.Tensor, spec: ToyVideoSpec | None = None) -> dict:
    """Detect the attributes of one video ``[3, F, H, W]``.

    Returns ``{"colour", "direction", "shape"}`` (each ``"none"`` when there is no foreground / no motion)
    and diagnostics: ``mean_colour`` (RGB of the foreground), ``centroids`` (per frame [row, col] or None),
    ``displacement`` ([d_row, d_col] first→last frame or None), ``foreground_pixels`` (per frame).
    """
    if not isinstance(video, torch.Tensor) or video.dim() != 4:
        raise ToySpecError(f"detect expects one video [3, F, H, W], got {getattr(video, 'shape', type(video))}")
    return detect_batch(video.unsqueeze(0), spec)[0]


def _accuracies(a: _Analysis, prompts: Sequence[str]) -> dict[str, float]:
    n = a.x.shape[0]
    if len(prompts) != n:
        raise ToySpecError(f"got {n} videos but {len(prompts)} prompts")
    if n == 0:
        raise ToySpecError("prompt accuracy needs at least one video")
    wanted = [parse_toy_prompt(p) for p in prompts]
    got = {"colour": a.colours(), "direction": a.directions(), "shape": a.shapes()}
    hits = {k: [w[k] == g for w, g in zip(wanted, got[k])] for k in got}
    both = [all(h) for h in zip(*hits.values())]
    return {
        "prompt_accuracy": sum(both) / n,
        "colour_accuracy": sum(hits["colour"]) / n,
        "direction_accuracy": sum(hits["direction"]) / n,
        "shape_accuracy": sum(hits["shape"]) / n,
    }


def prompt_accuracy(videos: torch.Tensor, prompts: Sequence[str], spec: ToyVideoSpec | None = None) -> dict[str, float]:
    """How often the detector reads back the prompt.

    Returns ``prompt_accuracy`` (colour, direction and shape all match), ``colour_accuracy``,
    ``direction_accuracy`` and ``shape_accuracy`` as fractions of the N videos. The shape is chosen among
    ``spec.shapes``, so with a single shape kind it always matches when anything is drawn.
    """
    return _accuracies(_Analysis(videos, spec or ToyVideoSpec()), prompts)


def sharpness_terms(videos: torch.Tensor, spec: ToyVideoSpec | None = None) -> dict[str, torch.Tensor]:
    """Per-video sharpness and its two factors, each ``[N]`` in [0, 1].

    * ``single_object``: per frame, the share of soft foreground mass (pixels weighted by their distance from
      the background, faint haze included) that lies in the largest 8-connected component, averaged over
      frames. Two shapes, ghost copies or a haze around the shape lower it; an empty frame scores 0.
    * ``crispness``: 1 - mean blur error of the non-background pixels (see ``_Analysis.crispness``): pixels
      should be either background or the detected palette colour, not in between or another colour.
    * ``sharpness`` = single_object x crispness; 1 for a real toy video, 0 for an empty one.
    """
    return _Analysis(videos, spec or ToyVideoSpec()).sharpness_terms()


def sharpness(videos: torch.Tensor, spec: ToyVideoSpec | None = None) -> torch.Tensor:
    """Per-video single-object x crispness score ``[N]`` in [0, 1] (see ``sharpness_terms``)."""
    return sharpness_terms(videos, spec)["sharpness"]


def toy_features(videos: torch.Tensor, spec: ToyVideoSpec | None = None) -> torch.Tensor:
    """Fixed (not learned) features for the Fréchet distance, ``[N, D]`` float64, D = K + 7 + 4F.

    Per video: palette histogram of the foreground mass (K), mean foreground colour (3), mean background
    colour (3), centroid trajectory (2F, in [0, 1]), foreground mass per frame (F, in shape-box units), edge
    energy per frame (F, 1 for a clean square) and the sharpness score (1).
    """
    return _Analysis(videos, spec or ToyVideoSpec()).features()


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]`` (N, M >= 2).

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``, in float64. The cross term
    uses the symmetric form, so only symmetric PSD square roots (eigh) are needed.
    """
    for name, t in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 2:
            raise ToySpecError(f"{name} must be a [N >= 2, D] tensor, got {getattr(t, 'shape', type(t))}")
        if not torch.isfinite(t).all():
            raise ToySpecError(f"{name} contains NaN or inf")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ToySpecError(f"feature sizes differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T, correction=1), torch.cov(b.T, correction=1)
    cov_a, cov_b = cov_a.reshape(a.shape[1], a.shape[1]), cov_b.reshape(b.shape[1], b.shape[1])  # D = 1
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a).trace()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(fd), 0.0)


def toy_metrics(
    videos: torch.Tensor,
    prompts: Sequence[str],
    reference_videos: torch.Tensor,
    spec: ToyVideoSpec | None = None,
) -> dict[str, float]:
    """All toy metrics for generated ``videos [N, 3, F, H, W]`` against real ``reference_videos [M, 3, F, H, W]``.

    Returns ``prompt_accuracy``, ``colour_accuracy``, ``direction_accuracy``, ``shape_accuracy`` (fractions),
    ``sharpness`` (mean of the per-video score in [0, 1]) and ``frechet_distance`` (in ``toy_features`` space;
    lower is better, compare only numbers computed with the same N and M).
    """
    spec = spec or ToyVideoSpec()
    gen = _Analysis(videos, spec)
    ref = _Analysis(reference_videos, spec)
    if gen.x.shape[2:] != ref.x.shape[2:]:
        raise ToySpecError(
            f"videos {list(gen.x.shape)} and reference_videos {list(ref.x.shape)} differ in frames/size"
        )
    out = _accuracies(gen, prompts)
    out["sharpness"] = float(gen.sharpness_terms()["sharpness"].mean())
    out["frechet_distance"] = frechet_distance(gen.features(), ref.features())
    return out


__all__ = [
    "detect",
    "detect_batch",
    "frechet_distance",
    "prompt_accuracy",
    "sharpness",
    "sharpness_terms",
    "toy_features",
    "toy_metrics",
]
