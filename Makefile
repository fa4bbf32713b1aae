# Two commands for a fresh machine:  `make demo`  and  `make test`.
# torch is pinned to 2.13.0: pip takes the local CPU build (a plain `torch` would pull a CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench bench-inference clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,server]'
	@# A CJK font for drawing Chinese labels and rendering the synthetic world; never downloaded at run time.
	@if [ ! -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq fonts-wqy-zenhei) >/dev/null 2>&1 || echo "note: could not install fonts-wqy-zenhei"; fi
	@# Headless Chromium + its driver for the web-page test (tests/test_web.py skips without them).
	@if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || echo "note: could not install chromium"; fi

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_quant.py

bench-inference: install     # qwenvl vs transformers: encode, prefill, TTFT, decode, memory (~15 min, ~10 GB)
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
