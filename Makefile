# A new user on a bare machine runs `make test` or `make demo` and nothing else.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# `make demo` needs only the runtime dependencies; `make test` adds the dev extra (test tools,
# scikit-image, matplotlib, Jupyter's kernel, pandas): 91 s to install against 72 s, measured.
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: test test-numerics-default test-gpu demo install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes (the dev stamp follows the runtime one).
$(RUNTIME_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

# The tests whose float comparisons depend on the CPU's kernels (tolerances: tests/numerics.py),
# listed once, here. `make test-numerics-default` runs them again on other kernels than the
# machine's own, as another x86 CPU (AMD, no AVX-512) would compute: ATen's portable kernels,
# MKL's vendor-neutral code path, oneDNN without AVX-512. Inductor, which then generates scalar
# C++, gets its own cache: its cache key ignores the vector ISA, and AVX-512 code cached by
# `make test` does not build without it.
NUMERICS_TESTS := \
	tests/test_numerics.py \
	tests/lm/test_model.py tests/lm/test_compile.py tests/lm/test_loss.py tests/lm/test_training_path.py \
	tests/lm/test_hf.py tests/lm/test_real_layout.py \
	tests/encoders/test_open_clip.py tests/projector/test_projector.py \
	tests/multimodal/test_model.py tests/multimodal/test_export.py \
	tests/multimodal/test_generation.py tests/multimodal/test_compiled_generation.py \
	tests/multimodal/test_training.py::test_compiled_decoder_blocks_train_like_eager \
	tests/benchmarks/test_train_step.py tests/benchmarks/test_decode.py
# Inductor's scalar C++ (what it generates under ATEN_CPU_CAPABILITY=default) passes this test too,
# but takes ~40 s to compile cold; the aot_eager tests above check the compiled step's numbers.
NUMERICS_SKIP := tests/multimodal/test_compiled_generation.py::test_inductor_compiled_tokens_equal_eager
NUMERICS_ENV := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(VENV)/inductor-cache-default

test-numerics-default: $(STAMP)
	env $(NUMERICS_ENV) $(VENV)/bin/python -m pytest -q -p no:cacheprovider $(NUMERICS_TESTS) \
		$(addprefix --deselect ,$(NUMERICS_SKIP))

# On a CUDA machine with the gpu extra: xformers against SDPA (not collected on CPU machines).
test-gpu: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[gpu]"
	$(VENV)/bin/python -m pytest -q tests/gpu

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/salamandra-vl demo

clean:
	rm -rf $(VENV) runs .pytest_cache
