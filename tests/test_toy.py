"""The toy task: synthetic videos are what they claim, and the metrics separate good from bad outputs."""

import numpy as np
import pytest
import torch

from sfplus.toy import (
    ToyVideoDataset,
    ToyVideoSpec,
    detect,
    frechet_distance,
    make_toy_batch,
    make_toy_sample,
    parse_toy_prompt,
    prompt_accuracy,
    render_toy_video,
    sharpness,
    sharpness_terms,
    toy_features,
    toy_metrics,
    toy_prompts,
)

N = 64


@pytest.fixture(scope="module")
def real():
    return make_toy_batch(N, seed=0)


@pytest.fixture(scope="module")
def reference():
    return make_toy_batch(N, seed=1)[0]


# ---- videos ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        ToyVideoSpec(),
        ToyVideoSpec(frames=8),
        ToyVideoSpec(frames=8, height=24, width=20, shapes=("square", "plus", "diamond"), background=-0.6),
    ],
)
def test_videos_are_clean_shapes_inside_the_frame(spec):
    data = ToyVideoDataset(16, seed=3, spec=spec)
    for i in range(len(data)):
        item = data[i]
        video, prompt = item["video"], item["prompt"]
        assert item["index"] == i
        assert video.shape == (3, spec.frames, spec.height, spec.width) and video.dtype == torch.float32
        attrs = parse_toy_prompt(prompt, spec)
        colour = spec.palette[spec.colours.index(attrs["colour"])]
        is_bg = (video == spec.background).all(dim=0)
        is_fg = (video == colour[:, None, None, None]).all(dim=0)
        assert (is_bg | is_fg).all(), "every pixel is exactly background or exactly the shape colour"
        # Never clipped by the frame edge: same pixel count in every frame.
        counts = is_fg.sum(dim=(1, 2))
        assert (counts == counts[0]).all() and counts[0] > 0
    assert ToyVideoSpec(frames=8).speed == 1 and ToyVideoSpec().speed == 2


def test_dataset_is_deterministic_per_index():
    a, b = ToyVideoDataset(8, seed=5), ToyVideoDataset(8, seed=5)
    order = [7, 2, 5, 0]
    for i in order:  # reading order must not matter
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["prompt"] == b[i]["prompt"]
    other = ToyVideoDataset(8, seed=6)
    assert any(not torch.equal(a[i]["video"], other[i]["video"]) for i in range(8))
    with pytest.raises(IndexError):
        a[8]


def test_prompts_enumerate_and_parse():
    spec = ToyVideoSpec(shapes=("square", "plus"))
    prompts = toy_prompts(spec)
    assert len(prompts) == len(set(prompts)) == 4 * 2 * 4
    assert prompts[0] == "a red square moving left"
    assert parse_toy_prompt(" A Red plus moving Up. ") == {"colour": "red", "shape": "plus", "direction": "up"}
    for bad in ["a red square", "a purple square moving left", "a red square moving sideways", ""]:
        with pytest.raises(ValueError, match="toy prompt"):
            parse_toy_prompt(bad)
    with pytest.raises(ValueError, match="'a red plus moving up'"):
        parse_toy_prompt("a red plus moving up", ToyVideoSpec())  # plus not in the default spec


def test_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="speed"):
        ToyVideoSpec(frames=8, speed=2)  # 5 + 7 * 2 > 16: would leave the frame
    with pytest.raises(ValueError, match="colours"):
        ToyVideoSpec(colours=("red", "purple"))
    with pytest.raises(ValueError, match="too close"):
        ToyVideoSpec(colours=("white",), background=0.9)
    with pytest.raises(ValueError, match="frames"):
        ToyVideoSpec(frames=1)
    assert ToyVideoSpec(colours=["red", "blue"]).colours == ("red", "blue")  # YAML lists become tuples


# ---- detector and prompt accuracy ----------------------------------------------------------------------
def test_detector_reads_a_rendered_video():
    spec = ToyVideoSpec()
    video = render_toy_video(spec, "blue", "square", "up", top=10, left=3)
    found = detect(video)
    assert (found["colour"], found["direction"], found["shape"]) == ("blue", "up", "square")
    assert found["displacement"] == [-6.0, 0.0]
    assert found["centroids"][0] == [12.0, 5.0] and found["foreground_pixels"] == [25] * 4
    empty = detect(torch.full((3, 4, 16, 16), -1.0))
    assert (empty["colour"], empty["direction"], empty["displacement"]) == ("none", "none", None)


def test_real_videos_score_perfectly(real, reference):
    videos, prompts = real
    m = toy_metrics(videos, prompts, reference)
    assert m["prompt_accuracy"] == m["colour_accuracy"] == m["direction_accuracy"] == 1.0
    assert m["sharpness"] == pytest.approx(1.0)
    spec = ToyVideoSpec(frames=8, shapes=("square", "plus", "diamond"))
    v8, p8 = make_toy_batch(32, seed=2, spec=spec)
    assert prompt_accuracy(v8, p8, spec)["prompt_accuracy"] == 1.0


def test_wrong_colour_or_direction_scores_zero():
    spec = ToyVideoSpec()
    rng = np.random.default_rng(0)
    swap_colour = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
    swap_dir = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong_c, wrong_d, prompts = [], [], []
    for prompt in toy_prompts(spec):
        a = parse_toy_prompt(prompt)
        wrong_c.append(make_toy_sample(spec, rng, swap_colour[a["colour"]], "square", a["direction"])[0])
        wrong_d.append(make_toy_sample(spec, rng, a["colour"], "square", swap_dir[a["direction"]])[0])
        prompts.append(prompt)
    acc_c = prompt_accuracy(torch.stack(wrong_c), prompts)
    acc_d = prompt_accuracy(torch.stack(wrong_d), prompts)
    assert acc_c["prompt_accuracy"] == acc_c["colour_accuracy"] == 0.0 and acc_c["direction_accuracy"] == 1.0
    assert acc_d["prompt_accuracy"] == acc_d["direction_accuracy"] == 0.0 and acc_d["colour_accuracy"] == 1.0


# ---- sharpness and Fréchet distance ---------------------------------------------------------------------
def _blurred_average(videos, k=4):
    """Mean of k different real videos: what a generator that hedges between modes draws."""
    return videos.view(-1, k, *videos.shape[1:]).mean(dim=1).repeat_interleave(k, dim=0)


def _noise(like):
    return torch.rand(like.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_sharpness_separates_blur_mixtures_and_noise(real):
    videos, _ = real
    assert sharpness(videos).min() == pytest.approx(1.0)
    assert sharpness(_blurred_average(videos)).mean() < 0.3
    assert sharpness(_noise(videos)).mean() < 0.3
    # Two crisp shapes in one clip: crisp, but only half the mass is in the largest object.
    spec = ToyVideoSpec()
    two = torch.maximum(
        render_toy_video(spec, "red", "square", "right", top=0, left=0),
        render_toy_video(spec, "red", "square", "right", top=10, left=0),
    )
    terms = sharpness_terms(two[None])
    assert terms["crispness"].item() == pytest.approx(1.0)
    assert terms["single_object"].item() == pytest.approx(0.5)


def test_spatial_blur_keeps_prompt_but_loses_sharpness(real, reference):
    videos, prompts = real
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel[:, None] * kernel[None, :]).view(1, 1, 3, 3)
    frames = videos.transpose(1, 2).reshape(-1, 1, 16, 16) + 1  # background 0 so zero padding is neutral
    blurred = (torch.nn.functional.conv2d(frames, kernel, padding=1) - 1).view(N, 4, 3, 16, 16).transpose(1, 2)
    clean = toy_metrics(videos, prompts, reference)
    soft = toy_metrics(blurred, prompts, reference)
    assert soft["prompt_accuracy"] == 1.0  # the detector tolerates soft edges...
    assert soft["sharpness"] < 0.7  # ...the sharpness score does not
    assert soft["frechet_distance"] > 5 * clean["frechet_distance"]


def test_frechet_distance_ranks_real_above_degraded(real, reference):
    videos, prompts = real
    fd_real = toy_metrics(videos, prompts, reference)["frechet_distance"]
    fd_blur = toy_metrics(_blurred_average(videos), prompts, reference)["frechet_distance"]
    fd_noise = toy_metrics(_noise(videos), prompts, reference)["frechet_distance"]
    assert fd_real < 0.5
    assert fd_blur > 5 * fd_real and fd_noise > 100 * fd_real


def test_frechet_distance_matches_closed_form():
    # 1-D: means 0 and 3, sample variances 2 and 2 -> 9 + 2 + 2 - 2 * sqrt(2 * 2) = 9.
    assert frechet_distance(torch.tensor([[-1.0], [1.0]]), torch.tensor([[2.0], [4.0]])) == pytest.approx(9.0)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g, dtype=torch.float64)
    mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.3, 0.5]], dtype=torch.float64)
    b = torch.randn(300, 3, generator=g, dtype=torch.float64) @ mix + 1  # correlated, shifted
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)) == pytest.approx(5.0)
    centred = a - a.mean(0)
    assert frechet_distance(centred, 2 * centred) == pytest.approx(torch.cov(a.T).trace().item())
    # General case against another route: tr sqrt(C_a C_b) = sum of sqrt(eigenvalues of C_a C_b).
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    cross = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    expected = (a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)


def test_metrics_are_deterministic_and_check_inputs(real, reference):
    videos, prompts = real
    noisy = videos + 0.1 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(1))
    assert toy_metrics(noisy, prompts, reference) == toy_metrics(noisy.clone(), list(prompts), reference.clone())
    assert torch.equal(toy_features(noisy), toy_features(noisy))
    with pytest.raises(ValueError, match=r"\[N, 3, F, H, W\]"):
        toy_metrics(videos[0], prompts, reference)
    with pytest.raises(ValueError, match="prompts"):
        toy_metrics(videos, prompts[:-1], reference)
    with pytest.raises(ValueError, match="NaN"):
        sharpness(torch.full_like(videos[:2], float("nan")))
