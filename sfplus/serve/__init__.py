"""``sfplus serve``: a web page that streams a generator's video to the browser frame by frame.

    sfplus serve --config configs/toy/dmd.yaml --ckpt_path runs/toy-dmd/checkpoints/last.ckpt
    sfplus serve --config configs/wan2.1/t2v_13b_self_forcing_predict.yaml       # weights named in the config

A causal generator's frames appear as each block is generated and decoded; a bidirectional one shows the whole video
when done. Parts: :mod:`~sfplus.serve.loader` (config + checkpoint → the sampling net on the device),
:mod:`~sfplus.serve.jobs` (one generation at a time, a queue, cancellation), :mod:`~sfplus.serve.app` (FastAPI
page, WebSocket, downloads) and ``page.html``. Needs the ``serve`` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from jsonargparse import ArgumentParser

__all__ = ["main"]

SERVE_MODULES = ("fastapi", "uvicorn", "websockets", "PIL")


class MissingExtra(ValueError):
    """The optional dependencies of ``sfplus serve`` are not installed."""


def check_extra() -> None:
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"sfplus serve needs the 'serve' extra ({', '.join(missing)} missing): "
                           "pip install 'sfplus[serve]'")


def main(argv: list[str] | None = None, exit_on_error: bool = True) -> None:
    """Parse ``sfplus serve`` arguments, load the generator and run the server until Ctrl+C."""
    parser = ArgumentParser(prog="sfplus serve", exit_on_error=exit_on_error,
                            description="Stream a generator's videos to a web page, frame by frame.")
    parser.add_argument("--config", type=str, required=True, help="the recipe config (as for sfplus predict)")
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="a checkpoint of that recipe (default: the weights the config names)")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to listen on; 127.0.0.1 (default) is this machine only, 0.0.0.0 everyone")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", type=str, default="auto", help="cuda, cuda:1, cpu; auto: cuda if there is one")
    parser.add_argument("--precision", type=str, default="auto",
                        help="bf16 (autocast) or fp32; auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--fps", type=float, default=16.0, help="playback and MP4 frame rate")
    parser.add_argument("--max_prompt_chars", type=int, default=2000)
    parser.add_argument("--max_waiting", type=int, default=8, help="requests that may wait while one generates")
    parser.add_argument("--keep_videos", type=int, default=32, help="finished MP4s kept for download")
    parser.add_argument("--video_dir", type=str | None, default=None, help="where MP4s go (default: a temp folder)")
    args = parser.parse_args(argv)

    check_extra()
    import uvicorn

    from sfplus.serve.app import ServeSettings, create_app
    from sfplus.serve.loader import load_generator

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device (use --device cpu)")
    precision = ("bf16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be bf16, fp32 or auto, got {args.precision!r}")
    settings = ServeSettings(fps=args.fps, max_prompt_chars=args.max_prompt_chars, max_waiting=args.max_waiting,
                             keep_videos=args.keep_videos, video_dir=args.video_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    module = load_generator(args.config, args.ckpt_path, device)
    app = create_app(module, settings, torch.bfloat16 if precision == "bf16" else None)
    kind = module.sampler_description().get("kind")
    print(f"sfplus serve: {module.net_name} ({kind}) on {device}, {precision}; open http://{args.host}:{args.port} "
          "(Ctrl+C stops)", flush=True)
    # ws_max_size: an image-to-video request carries its image (up to 20 MB as base64) in one message.
    uvicorn.run(app, host=args.host, port=args.port, ws_max_size=32 * 2**20, log_level="warning")
