# Two commands do all the set-up on a fresh machine:
#   make demo   -- install into .venv (first time only), then render examples/plan.json with the demo model
#   make test   -- install into .venv (first time only), then check the import layers and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= onnx,llm,video,cluster,bench,serve,dev

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU build first: a bare torch requirement could otherwise pull a multi-GB CUDA build.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# CLIP's BPE vocabulary for the demo model ships in this wheel; --no-deps keeps torchvision out.
	$(BIN)/pip install -q --no-deps open-clip-torch
	touch $@

install: $(BIN)/.installed

demo: install
	# The toy demo model draws the styles of its world by name ("Neon style"); a token learned from its own renders
	# of film subjects it has never seen would only blur them, so the demo skips style training.
	$(BIN)/movielm-fast render examples/plan.json --no-style-training

test: install
	# The layers of docs/design.md first (contracts in pyproject.toml): a broken one fails the target.
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
