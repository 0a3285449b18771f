# The two README commands: `make demo` and `make test` (each creates .venv on first use).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-tfds-stamp
OUT ?= out/demo

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Train the digits config (resumes if out/demo/digits exists), print its last sample grid, then the 2-D solver demo.
demo: $(STAMP)
	$(BIN)/python train.py --config configs/digits.py --workdir $(OUT)/digits
	@echo "digits sample grid: $$(ls $(OUT)/digits/samples/step_*.png | sort | tail -1)"
	$(BIN)/python -m jaxdiff.demo --out $(OUT)

# The tests also exercise the TFDS source, so they install the optional `tfds` extra (no TensorFlow).
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,tfds]'
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/net_step.py --net tiny --batch 64

clean:
	rm -rf $(VENV) out
