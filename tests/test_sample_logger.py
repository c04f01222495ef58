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


def test_samples_reach_tensorboard_and_match_batch_generation(tmp_path):
    """A short toy DMD run with the logger every iteration: the image summaries decode to one row per prompt and
    one column per frame, and a logged video is the one generation makes for the same prompt, seed and index."""
    import io

    import lightning as L
    import numpy as np
    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sfplus.callbacks import SampleLogger
    from sfplus.conditioning.conditioner import ToyConditioner
    from sfplus.datamodules import PromptDataModule
    from sfplus.modules import DistillModule
    from tests.helpers import TINY, write_tiny_teacher

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red square moving left\na blue square moving up\n")
    module = DistillModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                           teacher_checkpoint=write_tiny_teacher(tmp_path / "t.safetensors"), video_shape=[3, 2, 4, 4],
                           dfake_gen_update_ratio=2)
    prompts = ["a red square moving left", "a green square moving down"]
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=TensorBoardLogger(str(tmp_path), name="tb"),
                        callbacks=[SampleLogger(prompts, every_n_iterations=1, upscale=1, seed=3)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=PromptDataModule(str(prompts_file), batch_size=2))
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples")
    assert [im.step for im in images] == [0, 1, 2]  # after each update, by the module's iteration counter
    assert (images[-1].height, images[-1].width) == (len(prompts) * 4, 2 * 4)  # rows: prompts; columns: frames
    # The last image was logged after the last update: generation now makes exactly its videos.
    _, videos = module.generate(prompts, torch.arange(2), torch.zeros(2, dtype=torch.long), 3)
    logged = torch.from_numpy(np.array(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")))
    assert torch.equal(logged.permute(2, 0, 1), frame_grid(videos))
