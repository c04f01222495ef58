"""``sfplus serve`` without a browser: streaming equals batch generation, the WebSocket protocol's messages for bad
input, the queue, a client that leaves, memory that stays flat over 20 generations, and the streaming toy demo
(``make serve-demo-causal``) sending its first block before the video is done."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import write_tiny_causal_run

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("fastapi")
pytest.importorskip("websockets")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    from sfplus.serve.loader import load_generator

    config, ckpt = write_tiny_causal_run(tmp_path_factory.mktemp("run"), frames=6, size=8, frames_per_block=2)
    return load_generator(config, ckpt, torch.device("cpu"))


def _serve(module, settings):
    """A uvicorn server of ``module`` on a free port in a thread: yields (WebSocket URL, app state)."""
    import uvicorn

    from sfplus.serve.app import create_app

    app = create_app(module, settings)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"ws://127.0.0.1:{port}/ws", app.state.sfplus
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(module, tmp_path_factory):
    from sfplus.serve.app import ServeSettings

    yield from _serve(module, ServeSettings(max_waiting=1, keep_videos=2,
                                            video_dir=str(tmp_path_factory.mktemp("videos"))))


async def _request(url: str, request: dict, until=("done", "error", "cancelled")) -> tuple[list[dict], int]:
    """Send one request on a fresh connection; (JSON messages after hello, binary frames) up to a final one."""
    import websockets

    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        await ws.send(json.dumps(request))
        messages, frames = [], 0
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                frames += 1
                continue
            messages.append(json.loads(msg))
            if messages[-1]["type"] in until:
                return messages, frames


def request(url: str, **req) -> tuple[list[dict], int]:
    return asyncio.run(_request(url, {"type": "generate", **req}))


def test_stream_blocks_are_the_generated_video(module):
    index, sample = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    blocks = list(module.stream(["a red square"], index, sample, 5))
    assert [b.shape[1] for b in blocks] == [2, 2, 2]  # one decoded block per causal block
    _, video = module.generate(["a red square"], index, sample, 5)
    assert torch.equal(torch.cat(blocks, dim=1), video)


def test_generation_streams_block_by_block_and_bad_input_gets_a_message(server):
    url, state = server
    messages, frames = request(url, prompt="a red square moving left", seed=3)
    kinds = [m["type"] for m in messages]
    assert kinds == ["queued", "started", "block", "block", "block", "done"] and frames == 6
    done = messages[-1]
    assert done["frames"] == 6 and done["time_to_first_frame"] <= done["seconds"] and done["video"].endswith(".mp4")
    for req, expected in [
        ({"prompt": "   "}, "type a prompt first"),
        ({"prompt": "x" * 10_000}, "the prompt has 10000 characters; at most 2000"),
        ({"prompt": "ok", "seed": -1}, "the seed must be a whole number"),
        ({"prompt": "ok", "seed": "abc"}, "the seed must be a whole number"),
        ({"prompt": "ok", "image": "data:image/png;base64,AAAA"}, "text-to-video model: it takes no image"),
    ]:
        messages, frames = request(url, **req)
        assert messages[-1]["type"] == "error" and expected in messages[-1]["message"], (req, messages)
        assert frames == 0
    assert state.queue.running is None and not state.queue.waiting  # and the server still serves:
    assert request(url, prompt="again", seed=3)[1] == 6


def test_broken_images_get_a_message():
    from sfplus.serve.app import decode_image

    with pytest.raises(ValueError, match="could not be read"):
        decode_image("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), (8, 8), 2**20)
    with pytest.raises(ValueError, match="did not arrive intact"):
        decode_image("data:image/png;base64,@@@", (8, 8), 2**20)
    with pytest.raises(ValueError, match="larger than 1 MB"):
        decode_image("A" * (2 * 2**20), (8, 8), 2**20)


def test_queue_positions_and_a_client_that_leaves(server):
    """While one generation runs the next waits (position 1) and a third is turned away (max_waiting=1); a client
    that disconnects mid-generation stops it, and the server goes on."""
    import websockets

    url, state = server

    async def scenario():
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            for ws in (first, second):
                await ws.recv()
            await first.send(json.dumps({"type": "generate", "prompt": "one", "seed": 1}))
            while json.loads(await first.recv())["type"] != "started":
                pass
            await second.send(json.dumps({"type": "generate", "prompt": "two", "seed": 2}))
            assert json.loads(await second.recv()) == {"type": "queued", "position": 1}
            await second.send(json.dumps({"type": "generate", "prompt": "two again"}))  # the same tab again
            assert "already has a generation" in json.loads(await second.recv())["message"]
            third, _ = await _request(url, {"type": "generate", "prompt": "three"})
            assert third[-1]["type"] == "error" and "busy" in third[-1]["message"]
            await first.close()  # leaves mid-generation
            kinds = []
            while not kinds or kinds[-1] not in ("done", "error"):
                msg = await second.recv()
                if isinstance(msg, str):
                    kinds.append(json.loads(msg)["type"])
            return kinds

    completed = state.queue.completed
    assert asyncio.run(scenario())[-1] == "done"
    _wait_idle(state, completed + 2)
    assert state.queue.completed == completed + 2 and state.queue.running is None


def _wait_idle(state, completed: int) -> None:
    """Until the worker has finished ``completed`` jobs: it clears a job up just after its client was told "done"."""
    deadline = time.monotonic() + 30
    while state.queue.completed < completed and time.monotonic() < deadline:
        time.sleep(0.05)


def _live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                total += obj.untyped_storage().nbytes()
        except Exception:  # storages of meta or freed tensors
            continue
    return total


def test_memory_after_twenty_generations_is_what_it_was_after_the_first(server):
    """Live tensor bytes in the process after generation 20 are no more than after generation 1 (the prompts reuse
    one set of words: the toy text encoder keeps a vector per word it has seen, 64 bytes each, which is its design,
    not a leak)."""
    url, state = server
    words = ["red", "blue", "square", "moving", "left", "up"]
    start = state.queue.completed
    request(url, prompt=" ".join(words), seed=0)
    _wait_idle(state, start + 1)
    after_first = _live_tensor_bytes()
    for i in range(19):
        prompt = " ".join(words[(i + j) % len(words)] for j in range(4))
        assert request(url, prompt=prompt, seed=i + 1)[0][-1]["type"] == "done"
    _wait_idle(state, start + 20)
    # Not more (a leak grows with every generation); it may be less when tensors other tests left behind in this
    # process are collected in between (the flake seen when the asset tests ran first).
    assert _live_tensor_bytes() <= after_first
    assert len(state.videos) == 2 and len(list(state.settings.video_dir.iterdir())) == 2  # keep_videos


def test_the_streaming_toy_demo_sends_its_first_block_before_the_video_is_done(tmp_path):
    """``make serve-demo-causal``: configs/toy/causal_dmd_stream.yaml with a checkpoint of the kind ``make
    demo-causal`` writes (here the student before training: the shipped streaming teacher's weights, saved as a
    Lightning checkpoint) streams two blocks of 4 frames; the first arrives before the generation ends."""
    from sfplus.serve.app import ServeSettings
    from sfplus.serve.loader import load_generator, module_from_config

    config = ROOT / "configs" / "toy" / "causal_dmd_stream.yaml"
    student = module_from_config(config)
    student.configure_model()
    ckpt = {"state_dict": student.state_dict()}
    student.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")
    del student, ckpt
    module = load_generator(config, tmp_path / "last.ckpt", torch.device("cpu"))

    async def generate(url):  # (what arrived, seconds since the request) in order
        import websockets

        async with websockets.connect(url) as ws:
            assert json.loads(await ws.recv())["model"]["causal"]
            start = time.perf_counter()
            await ws.send(json.dumps({"type": "generate", "prompt": "a red square moving left", "seed": 0}))
            arrived = []
            while not arrived or arrived[-1][0] not in ("done", "error"):
                msg = await ws.recv()
                arrived.append(("frame" if isinstance(msg, bytes) else json.loads(msg)["type"],
                                time.perf_counter() - start))
                if arrived[-1][0] == "done":
                    done = json.loads(msg)
            return arrived, done

    for url, _ in _serve(module, ServeSettings(video_dir=str(tmp_path / "videos"))):
        arrived, done = asyncio.run(generate(url))
    kinds = [k for k, _ in arrived]
    assert kinds == ["queued", "started", "block"] + ["frame"] * 4 + ["block"] + ["frame"] * 4 + ["done"], kinds
    first_frame = arrived[kinds.index("frame")][1]
    assert first_frame < arrived[-1][1] and done["time_to_first_frame"] < done["seconds"]
    assert done["frames"] == 8


def test_missing_extra_names_it(monkeypatch):
    import importlib.util

    from sfplus.serve import MissingExtra, check_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(MissingExtra, match=r"'serve' extra \(uvicorn missing\): pip install 'sfplus\[serve\]'"):
        check_extra()
