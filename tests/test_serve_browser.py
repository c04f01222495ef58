"""``sfplus serve`` in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright) opens the page,
submits prompts and watches the video stream in.

Needs ``/usr/bin/chromium`` (``make browser`` installs it; CI runs that first) and the ``playwright`` package (the
``dev`` extra). Without them the test is skipped, unless ``SFPLUS_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which makes
a missing browser a failure. The screenshot of the page mid-stream goes to ``$SFPLUS_TEST_ARTIFACTS`` (default
``test-artifacts/`` in the checkout) as ``serve_midstream.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import write_tiny_causal_run

ROOT = Path(__file__).resolve().parent.parent
FRAMES, SIZE = 64, 16  # 64 one-frame causal blocks of 16x16: ~1-2 s on a CPU core, long enough to watch mid-stream
# The flags that keep Chromium quiet in a closed network and independent of any profile.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    required = os.environ.get("SFPLUS_REQUIRE_BROWSER") == "1"
    if path is None:
        if required:
            pytest.fail("SFPLUS_REQUIRE_BROWSER=1 but there is no chromium: run `make browser`")
        pytest.skip("no chromium on this machine (`make browser` installs Debian's)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("SFPLUS_REQUIRE_BROWSER=1 but playwright is not installed (the dev extra)")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``sfplus serve`` of a tiny causal student, as a user starts it, on a free port; yields its URL."""
    _chromium()
    root = tmp_path_factory.mktemp("serve")
    config, ckpt = write_tiny_causal_run(root, frames=FRAMES, size=SIZE)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(root / "server.log", "w+")  # noqa: SIM115 (read back on failure)
    proc = subprocess.Popen([sys.executable, "-m", "sfplus", "serve", "--config", str(config), "--ckpt_path",
                             str(ckpt), "--port", str(port), "--device", "cpu", "--max_waiting", "2",
                             "--video_dir", str(root / "videos")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"sfplus serve did not start:\n{log.read()}")
            time.sleep(0.2)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)
    log.seek(0)
    print(log.read())


def _health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())


def test_page_streams_frames_before_generation_ends_and_offers_the_mp4(server):
    from playwright.sync_api import sync_playwright

    from sfplus.video_io import read_mp4

    url, proc = server
    artifacts = Path(os.environ.get("SFPLUS_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(profile, executable_path=_chromium(), args=CHROMIUM_ARGS,
                                                       accept_downloads=True)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("window.sfplus.model !== null")
        assert "streams block by block" in page.text_content("#model")

        # Bad input gets a message on the page; the page (and the server) stay usable.
        page.click("#go")
        assert "type a prompt first" in page.text_content("#status")
        page.fill("#prompt", "x" * 10_000)
        page.click("#go")
        page.wait_for_function("window.sfplus.error.includes('at most')")
        assert "10000 characters" in page.text_content("#status")

        # A real prompt: frames arrive while the generation still runs.
        page.fill("#prompt", "a red square moving left")
        page.fill("#seed", "7")
        page.click("#go")
        page.wait_for_function("window.sfplus.frames > 0", polling="raf")
        mid = page.evaluate("({frames: sfplus.frames, done: sfplus.done})")
        page.screenshot(path=str(artifacts / "serve_midstream.png"))
        assert 0 < mid["frames"] < FRAMES and not mid["done"], mid
        page.wait_for_function("window.sfplus.done", timeout=120_000)
        state = page.evaluate("sfplus")
        assert state["frames"] == FRAMES and state["stats"]["frames"] == FRAMES and state["blocks"] == FRAMES
        times = {e["type"]: e["t"] for e in reversed(state["events"])}  # first occurrence of each
        done_t = [e["t"] for e in state["events"] if e["type"] == "done"][-1]
        assert times["first-frame"] < done_t
        assert "first frame:" in page.text_content("#ttff") and "frames/s" in page.text_content("#fps")

        # The MP4 download holds the same number of frames.
        with page.expect_download() as info:
            page.click("#download")
        video = read_mp4(info.value.path())
        assert video.shape[0] == FRAMES and video.shape[1] >= 256

        # A second tab waits in line, shown its position; closing a tab mid-stream stops its generation.
        other = browser.new_page()
        other.goto(url)
        other.wait_for_function("window.sfplus.model !== null")
        page.click("#go")
        page.wait_for_function("window.sfplus.frames > 0 && !window.sfplus.done", polling="raf")
        other.fill("#prompt", "a blue square moving up")
        other.click("#go")
        # Events, not the status line: under load the first tab's video may end before a poll sees "waiting".
        other.wait_for_function("window.sfplus.events.some(e => e.type === 'queued')")
        queued = other.evaluate("sfplus.events.filter(e => e.type === 'queued').map(e => e.position)")
        assert queued[0] == 1, queued
        page.close()  # the first tab leaves mid-stream: its generation stops and the second tab's starts
        other.wait_for_function("window.sfplus.done", timeout=120_000)
        assert other.evaluate("sfplus.frames") == FRAMES
        browser.close()
    deadline = time.monotonic() + 30
    while (health := _health(url))["completed"] < 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # the worker counts a job just after its client was told "done"
    assert proc.poll() is None and not health["running"] and health["waiting"] == 0
    assert health["completed"] == 3  # the first video, the cancelled one, the second tab's
