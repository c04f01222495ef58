"""SampleLogger: moving videos in TensorBoard (animated GIF image summaries), read back from the event file."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from sfplus.callbacks.sample_logger import gif_bytes, side_by_side

pytestmark = pytest.mark.usefixtures("one_thread")


def gif_frames(data: bytes) -> np.ndarray:
    """An animated GIF's frames as uint8 [T, H, W, 3]."""
    return np.stack([np.array(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(io.BytesIO(data)))])


def logged_videos(log_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}, events


def test_side_by_side_and_gif_round_trip():
    b, t, h, w = 2, 3, 4, 5
    videos = torch.randint(0, 255, (b, t, h, w, 3), dtype=torch.uint8)
    frames = side_by_side(videos)
    assert frames.shape == (t, h, b * w, 3)
    for i in range(b):
        assert np.array_equal(frames[:, :, i * w:(i + 1) * w], videos[i].numpy())
    assert side_by_side(videos, upscale=2).shape == (t, 2 * h, 2 * b * w, 3)
    # Fewer than 256 colours per frame: the GIF's palette holds them all, so the frames come back exactly.
    assert np.array_equal(gif_frames(gif_bytes(frames, fps=8)), frames)
    with pytest.raises(ValueError, match=r"uint8 frames \[T, H, W, 3\]"):
        gif_bytes(frames.astype(np.float32), fps=8)


def test_causal_generator_ema_and_teacher_reach_tensorboard_as_videos(tmp_path):
    """A short toy causal DMD run with the logger every iteration: generator videos at every step, the EMA once it
    started, the teacher once at the start; each GIF has the video's frame count and size and holds exactly the
    video generation makes for the same prompts, seed and weights."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from sfplus.callbacks import EMA, SampleLogger
    from sfplus.conditioning.conditioner import ToyConditioner
    from sfplus.datamodules import PromptDataModule
    from sfplus.modules import DistillModule
    from tests.helpers import TINY, write_tiny_teacher

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red square moving left\na blue square moving up\n")
    # 4 latent frames in 2 causal blocks; the toy codec maps a latent frame to a frame of 4x4 pixels.
    module = DistillModule(net="tiny", net_overrides=TINY, conditioner=ToyConditioner(text_dim=16, text_len=8),
                           teacher_checkpoint=write_tiny_teacher(tmp_path / "t.safetensors"), video_shape=[3, 4, 4, 4],
                           causal={"frames_per_block": 2}, dfake_gen_update_ratio=2)
    prompts = ["a red square moving left", "a green square moving down"]
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=TensorBoardLogger(str(tmp_path), name="tb"),
                        callbacks=[EMA(decay=0.5, start_iteration=1),
                                   SampleLogger(prompts, every_n_iterations=1, upscale=2, seed=3, teacher_steps=3)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=PromptDataModule(str(prompts_file), batch_size=2))
    videos, events = logged_videos(trainer.logger.log_dir)
    assert sorted(videos) == ["samples/ema", "samples/generator", "samples/teacher"]
    iterations = [im.step for im in videos["samples/generator"]]
    # Updates G C C G C C: the module's iteration counts critic updates, so 0 (after the first G) to 4.
    assert iterations == [0, 1, 2, 3, 4]
    assert [im.step for im in videos["samples/teacher"]] == [0]  # once, at the first logging step
    assert [im.step for im in videos["samples/ema"]] == [3, 4]  # once the EMA started (the G update at iteration 2)
    for name in ("generator", "ema", "teacher"):
        last = videos[f"samples/{name}"][-1]
        frames = gif_frames(last.encoded_image_string)
        assert frames.shape == (4, 2 * 4, 2 * 4 * len(prompts), 3)  # T frames; H x (B videos side by side) x 2
        assert (last.height, last.width) == frames.shape[1:3]
        # The last videos were logged after the last update: generation now makes exactly them.
        with module.using_weights(name, steps=3):
            _, video = module.generate(prompts, torch.arange(2), torch.zeros(2, dtype=torch.long), 3)
        assert np.array_equal(frames, side_by_side(video, upscale=2)), name
    cost = {tag for tag in events.Tags()["scalars"] if tag.startswith("samples/")}
    assert {"samples/generator/generate_seconds", "samples/generator/decode_seconds"} <= cost
    assert all(e.value >= 0 for e in events.Scalars("samples/generator/decode_seconds"))


def test_i2v_samples_use_first_frames_from_the_data(tmp_path):
    """An I2V DMD run (tiny Wan folder: real UMT5 / VAE / CLIP classes) logs videos conditioned on the first training
    batch's images (kept for every later step), at the video's frame count and size."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from sfplus.callbacks import SampleLogger
    from sfplus.conditioning.wan import WanConditioner
    from sfplus.datamodules.images import ImagePromptDataModule
    from sfplus.modules import DistillModule
    from tests.helpers import TINY_VAE, write_tiny_wan_folder

    pytest.importorskip("sentencepiece")
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(2):
        rgb = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
        Image.fromarray(rgb).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a cat number {i}")
    wan = write_tiny_wan_folder(tmp_path / "wan")
    cond = WanConditioner(model_dir=str(wan), i2v=True, num_pixel_frames=5, vae_config=TINY_VAE, clip_num_heads=2,
                          text_dtype="fp32")
    module = DistillModule(net="tiny-i2v", net_overrides={"text_dim": 32, "text_len": 512, "image_dim": 32},
                           conditioner=cond, dfake_gen_update_ratio=2, video_shape=[16, 2, 2, 2], seed=1)
    logger = SampleLogger(["a cat", "a dog", "a bird"], every_n_iterations=2, upscale=1, teacher=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=TensorBoardLogger(str(tmp_path), name="tb"),
                        callbacks=[logger], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    data = ImagePromptDataModule(str(folder), batch_size=2, size=[16, 16])
    trainer.fit(module, datamodule=data)
    videos, _ = logged_videos(trainer.logger.log_dir)
    assert sorted(videos) == ["samples/generator"]
    frames = gif_frames(videos["samples/generator"][-1].encoded_image_string)
    assert frames.shape == (5, 16, 3 * 16, 3)  # 1 + 4 (F - 1) frames of 16x16, three prompts side by side
    first = logger._images["first_frame"]  # the first batch's two images; the third prompt reuses the first
    assert first.shape == (3, 3, 16, 16) and torch.equal(first[2], first[0])
