"""Time ``sfplus serve`` on a real-size generator: time to first frame, frames/s and GPU memory, measured through the
server's own code path (the FastAPI app under uvicorn, a WebSocket client in this process).

Builds the Wan2.1 T2V 1.3B causal generator (preset ``wan2.1-t2v-1.3b``, 21 latent frames = 81 frames of 480x832 in
blocks of 3, the 4-step Self-Forcing sampler) with random weights, and the real-size Wan VAE (random weights: the
decode cost is the real one). With ``--wan_dir`` (a Wan2.1-T2V-1.3B folder) the real UMT5 and VAE load from it;
without, a stand-in text encoder of UMT5's output shape ([B, 512, 4096]) is used — the T5 cost is then missing from
the first frame's time (it runs once per prompt, before the first block).

    python tools/serve_bench.py --generations 3            # on a CUDA machine
    python tools/serve_bench.py --frames 6 --size 8 --net tiny --device cpu   # a smoke test of the tool itself

Prints one line per generation and a summary: time to first frame, frames/s, peak and after-generation memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(args) -> torch.nn.Module:
    from sfplus.conditioning.wan import WanConditioner
    from sfplus.modules import DistillModule
    from sfplus.nets.codec import WanVAECodec
    from sfplus.nets.presets import get_config
    from sfplus.nets.text import ToyTextEncoder
    from sfplus.nets.vae import WanVAE

    cfg = get_config(args.net)
    if args.wan_dir:
        conditioner = WanConditioner(model_dir=args.wan_dir)
    else:
        vae = WanVAE() if args.net.startswith("wan") else WanVAE(dim=4, num_res_blocks=1)
        conditioner = WanConditioner.from_modules(ToyTextEncoder(dim=cfg.text_dim, max_len=cfg.text_len),
                                                  WanVAECodec(vae))
    h, w = args.size if len(args.size) == 2 else args.size * 2
    module = DistillModule(net=args.net, conditioner=conditioner, causal={"frames_per_block": 3},
                           video_shape=[cfg.in_dim, args.frames, h, w], predict_weights="generator",
                           schedule={"shift": 5.0})
    module.configure_model()
    return module


async def one_generation(url: str, prompt: str, seed: int) -> dict:
    import websockets

    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # hello
        start = time.perf_counter()
        await ws.send(json.dumps({"type": "generate", "prompt": prompt, "seed": seed}))
        first, frames = None, 0
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                frames += 1
                first = first or time.perf_counter() - start
                continue
            m = json.loads(msg)
            if m["type"] == "error":
                raise RuntimeError(m["message"])
            if m["type"] == "done":
                return {**m, "client_first_frame": first, "client_frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="wan2.1-t2v-1.3b")
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    parser.add_argument("--size", type=int, nargs="+", default=[60, 104], help="latent H W (60 104 = 480x832)")
    parser.add_argument("--wan_dir", default=None, help="a Wan2.1-T2V-1.3B folder for the real UMT5 and VAE")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--generations", type=int, default=3)
    args = parser.parse_args()

    import uvicorn

    from sfplus.serve.app import ServeSettings, create_app
    from sfplus.serve.loader import prepare_for_serving

    device = torch.device(args.device)
    t0 = time.perf_counter()
    module = prepare_for_serving(build(args), device)
    print(f"built {args.net} on {device} in {time.perf_counter() - t0:.0f} s", flush=True)
    amp = torch.bfloat16 if device.type == "cuda" else None
    app = create_app(module, ServeSettings(fps=16), amp)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           ws_max_size=32 * 2**20))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"ws://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/ws"
    cuda = device.type == "cuda"
    results, after = [], []
    for i in range(args.generations):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = asyncio.run(one_generation(url, "A cat walks on the grass, realistic style.", i))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        after.append(torch.cuda.memory_allocated() / 2**30 if cuda else float("nan"))
        results.append(r)
        print(f"generation {i + 1}: {r['frames']:.0f} frames in {r['seconds']:.2f} s, first frame after "
              f"{r['time_to_first_frame']:.2f} s (client saw it after {r['client_first_frame']:.2f} s), "
              f"{r['fps']:.1f} frames/s; GPU memory peak {peak:.2f} GiB, after {after[-1]:.2f} GiB", flush=True)
    server.should_exit = True
    thread.join(timeout=10)
    warm = results[1:] or results
    print(f"summary ({args.net}, {args.frames} latent frames {args.size}, {device}"
          f"{', ' + torch.cuda.get_device_name() if cuda else ''}): time to first frame "
          f"{min(r['time_to_first_frame'] for r in warm):.2f} s, {max(r['fps'] for r in warm):.1f} frames/s "
          f"(warm runs), memory after each generation {[round(a, 3) for a in after]} GiB")


if __name__ == "__main__":
    main()
