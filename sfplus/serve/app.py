"""The ``sfplus serve`` web app (FastAPI + uvicorn): a page, a WebSocket that streams frames, MP4 downloads.

Protocol on ``/ws`` (one connection per browser tab):

* server → client JSON: ``hello`` (the model: name, sampler kind, causal, i2v, fps, limits), ``queued`` (position,
  1 = next), ``started``, ``block`` (index, frame count, seconds since start) followed by that many binary messages,
  one JPEG per frame, ``done`` (frames, seconds, time to first frame, frames/s, the MP4's URL), ``error`` (a message
  for the user), ``cancelled``;
* client → server JSON: ``{"type": "generate", "prompt", "seed", "image"?}`` (image: a data URL) and
  ``{"type": "stop"}``.

Why JPEG frames over a WebSocket, not fragmented MP4: each frame is on screen as soon as its block is decoded (an
MP4 fragment needs a whole group of pictures and a Media Source buffer that holds frames back), any frame size works
(H.264 needs even sizes; the toy's are 16x16), the browser decodes JPEG natively with no codec negotiation, and the
frame count the page sees is exactly the count generated. The MP4 for download is written once at the end.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gc
import io
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, Response

from sfplus.conditioning.i2v import resize_image
from sfplus.modules.base import RecipeModule
from sfplus.serve.jobs import GenerationQueue, Job, QueueFull
from sfplus.video_io import write_mp4

log = logging.getLogger("sfplus.serve")

__all__ = ["ServeSettings", "create_app", "decode_image", "jpeg"]

MAX_SEED = 2**31 - 1


class ServeSettings:
    """Limits and output settings of a server (see ``sfplus serve --help``)."""

    def __init__(self, fps: float = 16.0, max_prompt_chars: int = 2000, max_waiting: int = 8,
                 max_image_bytes: int = 20 * 2**20, keep_videos: int = 32, video_dir: str | None = None,
                 mp4_min_side: int = 256, jpeg_quality: int = 90) -> None:
        if fps <= 0 or max_prompt_chars < 1 or keep_videos < 1 or max_image_bytes < 1:
            raise ValueError("fps, max_prompt_chars, keep_videos and max_image_bytes must be positive")
        self.fps, self.max_prompt_chars, self.max_waiting = fps, max_prompt_chars, max_waiting
        self.max_image_bytes, self.keep_videos, self.mp4_min_side = max_image_bytes, keep_videos, mp4_min_side
        self.jpeg_quality = jpeg_quality
        self.video_dir = Path(video_dir) if video_dir else Path(tempfile.mkdtemp(prefix="sfplus-serve-"))


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """uint8 [H, W, 3] → JPEG bytes (no chroma subsampling: tiny frames keep their colours)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(out, format="JPEG", quality=quality, subsampling=0)
    return out.getvalue()


def decode_image(data_url: str, size: tuple[int, int], max_bytes: int) -> torch.Tensor:
    """A browser data URL (or bare base64) of an image → [1, 3, H, W] in [-1, 1], covered and centre-cropped to
    ``size`` = (H, W). Raises ValueError with a message for the user."""
    from PIL import Image, UnidentifiedImageError

    payload = data_url.split(",", 1)[1] if data_url.startswith("data:") else data_url
    if len(payload) * 3 // 4 > max_bytes:
        raise ValueError(f"the image is larger than {max_bytes // 2**20} MB")
    try:
        raw = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            rgb = np.array(img.convert("RGB"))
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"the image did not arrive intact ({err})") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError("the image could not be read: not a PNG, JPEG, WebP, GIF or BMP file, or damaged") from err
    if min(rgb.shape[:2]) < 2:
        raise ValueError(f"the image is {rgb.shape[1]}x{rgb.shape[0]} pixels: too small")
    img = torch.from_numpy(rgb).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)
    return resize_image(img, *size)


def _amp(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision as ``precision: bf16-mixed`` gives predict (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def model_info(module: RecipeModule, settings: ServeSettings) -> dict:
    kind = module.sampler_description().get("kind", "")
    return {"name": module.net_name, "kind": kind, "causal": kind.startswith("causal"), "i2v": module.is_i2v,
            "fps": settings.fps, "max_prompt_chars": settings.max_prompt_chars,
            "max_image_bytes": settings.max_image_bytes}


def generation_size(module: RecipeModule) -> tuple[int, int]:
    """Pixel (H, W) the module generates: its latent size times the codec's spatial stride."""
    stride = int(getattr(module.conditioner.video_codec(), "spatial_stride", 1))
    return module.video_shape[2] * stride, module.video_shape[3] * stride


def stream_fn(module: RecipeModule, amp_dtype: torch.dtype | None) -> Callable[[Job], Iterator[torch.Tensor]]:
    """A job's frame blocks uint8 [T_n, H, W, 3] from ``module.stream`` (seed = the job's: prompt index 0, sample
    0, so ``sfplus predict`` with ``predict_seed`` = that seed makes the same video for the same prompt)."""

    def stream(job: Job) -> Iterator[torch.Tensor]:
        # Autocast is per thread, and each block may run in another worker thread: entered around every step.
        with _amp(module.device, amp_dtype):
            image = module.image_condition({"image": job.image}) if job.image is not None else None
            blocks = module.stream([job.prompt], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                   job.seed, image)
        try:
            while True:
                with _amp(module.device, amp_dtype):
                    block = next(blocks, None)
                if block is None:
                    return
                yield block[0].cpu()
        finally:
            blocks.close()

    return stream


def release_memory(device: torch.device) -> Callable[[], None]:
    def release() -> None:
        gc.collect()  # a cancelled generation's frames and KV cache can sit in reference cycles (frames, tracebacks)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return release


class Session:
    """One browser tab's WebSocket: reports its job's progress (a :class:`~sfplus.serve.jobs.JobClient`)."""

    def __init__(self, ws: WebSocket, app_state: AppState) -> None:
        self.ws, self.state = ws, app_state
        self.job: Job | None = None
        self.lock = asyncio.Lock()  # a block's JSON header and its JPEGs go out together

    async def send(self, message: dict) -> None:
        async with self.lock:
            await self.ws.send_json(message)

    async def queued(self, position: int) -> None:
        await self.send({"type": "queued", "position": position})

    async def started(self) -> None:
        await self.send({"type": "started"})

    async def block(self, index: int, frames: torch.Tensor, elapsed: float) -> None:
        q = self.state.settings.jpeg_quality
        images = await asyncio.to_thread(lambda: [jpeg(f, q) for f in frames.numpy()])
        async with self.lock:
            await self.ws.send_json({"type": "block", "index": index, "frames": len(images), "elapsed": elapsed})
            for data in images:
                await self.ws.send_bytes(data)

    async def finished(self, frames: list[torch.Tensor], stats: dict[str, float]) -> None:
        name = await asyncio.to_thread(self.state.save_video, self.job.id, frames)
        self.job = None
        await self.send({"type": "done", **stats, "video": f"/video/{name}"})

    async def failed(self, message: str) -> None:
        self.job = None
        await self.send({"type": "error", "message": message})

    async def cancelled(self) -> None:
        self.job = None
        await self.send({"type": "cancelled"})


class AppState:
    """What the app's handlers share: the module, the queue, the settings and the finished videos."""

    def __init__(self, module: RecipeModule, settings: ServeSettings, amp_dtype: torch.dtype | None) -> None:
        self.module, self.settings = module, settings
        self.info = model_info(module, settings)
        self.size = generation_size(module) if module.is_i2v else None
        self.queue = GenerationQueue(stream_fn(module, amp_dtype), settings.max_waiting,
                                     after_job=release_memory(module.device))
        self.videos: OrderedDict[str, Path] = OrderedDict()

    def save_video(self, job_id: int, frames: list[torch.Tensor]) -> str:
        """Write the job's frames [T, H, W, 3] as an MP4 (upscaled so the short side is >= mp4_min_side); only the
        last ``keep_videos`` stay on disk. Returns the file name."""
        video = torch.cat(frames).numpy()
        upscale = max(1, -(-self.settings.mp4_min_side // min(video.shape[1:3])))
        name = f"sfplus_{os.getpid()}_{job_id}.mp4"
        path = self.settings.video_dir / name
        write_mp4(path, video, fps=round(self.settings.fps), upscale=upscale)
        self.videos[name] = path
        while len(self.videos) > self.settings.keep_videos:
            _, old = self.videos.popitem(last=False)
            old.unlink(missing_ok=True)
        return name

    def check_request(self, msg: dict) -> tuple[str, int, torch.Tensor | None]:
        """(prompt, seed, image) of a ``generate`` message; ValueError with a message for the user."""
        prompt = msg.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("type a prompt first: it is empty")
        prompt = prompt.strip()
        if len(prompt) > self.settings.max_prompt_chars:
            raise ValueError(f"the prompt has {len(prompt)} characters; at most {self.settings.max_prompt_chars} "
                             "are allowed")
        seed = msg.get("seed", 0)
        if isinstance(seed, str) and seed.strip().lstrip("-").isdigit():
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
        image = msg.get("image")
        if self.info["i2v"]:
            if not image:
                raise ValueError("this is an image-to-video model: drop a first frame (an image) on the page first")
            if not isinstance(image, str):
                raise ValueError("the image must be sent as a data URL")
            return prompt, seed, decode_image(image, self.size, self.settings.max_image_bytes)
        if image:
            raise ValueError("this is a text-to-video model: it takes no image (remove it)")
        return prompt, seed, None


def create_app(module: RecipeModule, settings: ServeSettings | None = None,
               amp_dtype: torch.dtype | None = None) -> FastAPI:
    """The app serving ``module`` (already on its device, eval mode): ``/`` page, ``/ws`` stream, ``/video/<name>``
    downloads, ``/health`` (queue state as JSON)."""
    settings = settings or ServeSettings()
    state = AppState(module, settings, amp_dtype)
    page = resources.files("sfplus.serve").joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.queue.start()
        yield
        await state.queue.stop()

    app = FastAPI(title="sfplus serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sfplus = state

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        q = state.queue
        return {"model": state.info, "waiting": len(q.waiting), "running": q.running is not None,
                "completed": q.completed}

    @app.get("/video/{name}")
    async def video(name: str) -> Response:
        path = state.videos.get(name)
        if path is None or not path.exists():
            return Response("no such video (only the last few are kept)", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="video/mp4", filename=name)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        session = Session(websocket, state)
        try:
            await session.send({"type": "hello", "model": state.info})
            while True:
                text = await websocket.receive_text()
                await handle(session, text)
        except WebSocketDisconnect:
            pass
        finally:
            if session.job is not None:  # the tab closed or reloaded: its generation stops
                await state.queue.withdraw(session.job)

    async def handle(session: Session, text: str) -> None:
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):
            await session.send({"type": "error", "message": "not a request this server understands (JSON object)"})
            return
        kind = msg.get("type")
        if kind == "stop":
            if session.job is not None and await state.queue.withdraw(session.job):
                await session.cancelled()  # it was still waiting: nobody else will say so
            return
        if kind != "generate":
            await session.send({"type": "error", "message": f"unknown request type {kind!r}"})
            return
        if session.job is not None:
            await session.send({"type": "error", "message": "this tab already has a generation queued or running: "
                                "wait for it or press Stop"})
            return
        try:
            prompt, seed, image = await asyncio.to_thread(state.check_request, msg)
        except ValueError as err:
            await session.send({"type": "error", "message": str(err)})
            return
        session.job = Job(prompt=prompt, seed=seed, client=session, image=image)
        try:
            await state.queue.submit(session.job)
        except QueueFull as err:
            session.job = None
            await session.send({"type": "error", "message": str(err)})

    return app
