"""SampleLogger's image: one row per video, one column per frame."""

import torch

from sfplus.callbacks.sample_logger import frame_grid


def test_frame_grid_puts_videos_in_rows_and_frames_in_columns():
    b, t, h, w = 2, 3, 4, 5
    videos = torch.randint(0, 255, (b, t, h, w, 3), dtype=torch.uint8)
    grid = frame_grid(videos)
    assert grid.shape == (3, b * h, t * w)
    for i in range(b):
        for j in range(t):
            assert torch.equal(grid[:, i * h:(i + 1) * h, j * w:(j + 1) * w], videos[i, j].permute(2, 0, 1))
    assert frame_grid(videos, upscale=2).shape == (3, 2 * b * h, 2 * t * w)
