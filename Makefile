# The two commands of the README:
#   make demo       set up, then distil the shipped toy teacher with DMD, generate MP4s, print the toy metrics
#   make test       set up, then lint (ruff) and run the test suite (what CI runs)
# and more:
#   make demo-full  the same, training the toy teacher first (configs/toy/teacher.yaml)
#   make serve-demo after `make demo`: `sfplus serve` of the demo's student on http://127.0.0.1:7860
#   make demo-causal        distil the shipped streaming toy teacher into a causal (Self-Forcing) student
#   make serve-demo-causal  after `make demo-causal`: serve it; the page shows its video block by block
#   make browser    install Debian's chromium (tests/test_serve_browser.py drives it; CI runs this before `make test`)
PYTHON ?= python3
VENV ?= .venv
# A CPU build is enough for the toy task and the tests; override for a CUDA machine, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo demo-full demo-causal serve-demo serve-demo-causal browser test clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python tools/toy_demo.py

demo-full: setup
	$(BIN)/python tools/toy_demo.py --train-teacher

demo-causal: setup
	$(BIN)/python tools/toy_demo.py --causal

serve-demo: setup
	OMP_NUM_THREADS=1 $(BIN)/sfplus serve --config configs/toy/dmd.yaml --ckpt_path runs/toy-dmd/checkpoints/last.ckpt \
		--device cpu --fps 8

serve-demo-causal: setup
	OMP_NUM_THREADS=1 $(BIN)/sfplus serve --config configs/toy/causal_dmd_stream.yaml \
		--ckpt_path runs/toy-causal-stream/checkpoints/last.ckpt --device cpu --fps 8

# Debian's chromium through apt (as root, or with sudo); nothing to do if it is there.
browser:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@chromium --version

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean-demo:
	rm -rf runs/toy-teacher runs/toy-dmd runs/toy-eval runs/toy-causal-stream runs/toy-eval-stream
