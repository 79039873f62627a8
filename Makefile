# The two commands a new user runs are `make demo` and `make test`; see README.md.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all bootstrap build test fmt lint crds demo clean

all: build

# libtorch (PyTorch wheel), CUDA headers and the S3 test server in a project-local venv.
bootstrap:
	bash scripts/bootstrap-libtorch.sh

build: bootstrap
	$(CARGO) build --release --workspace --bins

fmt:
	$(CARGO) fmt --all

lint: bootstrap
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

test: lint
	$(CARGO) test --workspace --all-features

# Regenerates the committed CRD and the Helm chart's copy; a test fails while either is stale.
crds:
	$(CARGO) run -q -p dreambooth-operator --bin crdgen > crds/dreamboothsession.yaml
	BLESS_CHART_CRD=1 $(CARGO) test -q -p dreambooth-tests --test chart chart_crd_body

# A whole session on the CPU: a tiny random model, generated photos of a toy, then
# examples/quickstart.yaml with checkpoints and samples. Outputs land in demo/output.
TRAINER := target/release/dreambooth-trainer
demo: bootstrap
	$(CARGO) build --release -p dreambooth-trainer --bins
	rm -rf demo
	$(TRAINER) tiny-model --out demo/tiny-model --seed 1
	$(TRAINER) demo-photos --out demo/photos --count 12 --size 96
	$(TRAINER) train examples/quickstart.yaml --device cpu
	@echo
	@echo "Model:   demo/output/quickstart.safetensors (loads in AUTOMATIC1111/ComfyUI like any SD 1.x file)"
	@echo "Samples: demo/output/samples/step_*/grid.png"
	@echo "Index:   demo/output/manifest.json"

clean:
	$(CARGO) clean
