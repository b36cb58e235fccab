# qwen-trt: every target sets up what it needs (a local .venv, the default model) on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= qwen2.5-coder-1.5b
PROMPT  ?= Write a Python function that checks whether a number is prime.
ONNX    ?= out/onnx
PLAN    ?= out/model.plan

.PHONY: venv model run chat serve test export engine kernels prebuilt bench golden clean

venv: $(VENV)/.done
$(VENV)/.done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@# the GPU path (cuda-python) wherever the NVIDIA driver sees a GPU; the kernels ship prebuilt (toolchain/prebuilt)
	if nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install -q --disable-pip-version-check -e '.[cuda]'; fi
	touch $@

model: venv
	$(BIN)/qtrt fetch --all

run: venv model
	$(BIN)/qtrt generate --model $(MODEL) --chat --prompt "$(PROMPT)" --max-new-tokens 96

chat: venv model
	$(BIN)/qtrt chat --model $(MODEL)

serve: venv model
	$(BIN)/qtrt serve --model $(MODEL) --host 127.0.0.1 --port $(or $(PORT),8000)

test: venv model
	$(BIN)/python -m pytest -ra -q

export: venv model
	$(BIN)/qtrt export $(MODEL) -o $(ONNX)

engine: export
	$(BIN)/qtrt engine $(ONNX) -o $(PLAN)

kernels: venv
	$(BIN)/python -m toolchain.kernels

# the cubins the package ships for both real models (rebuild after changing plugins/; tests/test_prebuilt.py checks)
prebuilt: venv
	$(BIN)/python -m toolchain.kernels --prebuilt

bench: venv
	$(BIN)/qtrt bench

golden: model
	$(PY) -m venv .venv-golden
	.venv-golden/bin/pip install -q torch==2.13.0 transformers gguf numpy tokenizers sentencepiece accelerate
	HF_HUB_OFFLINE=1 .venv-golden/bin/python scripts/make_golden.py

clean:
	rm -rf out build
