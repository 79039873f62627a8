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

# Regenerates the committed CRD; a test fails while it is stale.
crds:
	$(CARGO) run -q -p dreambooth-operator --bin crdgen > crds/dreamboothsession.yaml

demo: bootstrap
	@echo "make demo: not yet - the local end-to-end session arrives with the trainer's training loop."
	@echo "Meanwhile: cargo run -p dreambooth-trainer -- validate examples/quickstart.yaml"
	$(CARGO) run -q -p dreambooth-trainer -- validate examples/quickstart.yaml

clean:
	$(CARGO) clean
