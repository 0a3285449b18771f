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

# Train digits (resumes if out/demo/digits exists), sample 2,000 images (resumable shards), measure Fréchet
# distances with the digits classifier (trained model, real held-out data, Gaussian noise), run the 2-D solver
# demo, then write the HTML report and print its path.
RUN := $(OUT)/digits
SAMPLES := $(RUN)/samples_edm18
FD := $(BIN)/python -m eval.fid --ref digits --features digits_classifier
demo: $(STAMP)
	$(BIN)/python train.py --config configs/diffusion/digits.py --workdir $(RUN)
	$(BIN)/python sample.py --workdir $(RUN) --out $(SAMPLES) --num_samples 2000 --class_balanced \
		--batch_size 250 --shard_size 1000 --grid $(SAMPLES)/grid.png
	$(FD) --samples $(SAMPLES) --label "trained model, 2000 samples" --json $(RUN)/eval/trained.json
	$(FD) --samples $(SAMPLES) --num_samples 360 --label "trained model, 360 samples" --json $(RUN)/eval/trained_360.json
	$(FD) --samples digits:heldout --label "real held-out, 360 images" --json $(RUN)/eval/real_heldout.json
	$(FD) --samples noise --num_samples 360 --label "Gaussian noise, 360 images" --json $(RUN)/eval/noise.json
	$(BIN)/python -m jaxdiff.demo --out $(OUT)
	$(BIN)/python -m eval.report --workdir $(RUN) --samples $(SAMPLES)

# The tests also exercise the TFDS source, so they install the optional `tfds` extra (no TensorFlow).
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,tfds]'
	touch $(TEST_STAMP)

# Two workers (CI has 2 cores; the suite is mostly single-threaded XLA compilation), each test module on one
# worker so its module fixtures are built once.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope

bench: $(STAMP)
	$(BIN)/python bench/net_step.py --net tiny --batch 64

clean:
	rm -rf $(VENV) out
