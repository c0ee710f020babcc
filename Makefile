# The two commands of the README: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test deps test-deps build bench fuzz clean-state

deps:
	bash deploy/dev/install-deps.sh

test-deps:
	bash deploy/dev/install-deps.sh --test
	bash deploy/dev/pyenv.sh >/dev/null

build: deps
	$(CARGO) build --workspace --all-targets

# Records a live 1:1 Matrix call on loopback: a private Synapse, the mxrec bot with the embedded
# defaults (SQLite + local files under ./data), and an aiortc caller. demo.sh installs Synapse and
# the aiortc venv on first use (deploy/dev/synapse.sh, deploy/dev/pyenv.sh).
demo: deps
	bash deploy/dev/demo.sh

# Every test: unit tests, then the storage/catalog tests against a real Garage (S3) and PostgreSQL
# that deploy/dev/test.sh starts on loopback and stops afterwards; then every fuzz target for 60 s
# (a quick build: no sanitizer, dev profile; MXREC_SKIP_FUZZ=1 skips it).
test: test-deps
	bash deploy/dev/test.sh

# Composite speed against the ffmpeg CLI running the same filtergraph (prints a table).
bench: deps
	$(CARGO) bench -p transcoder --bench composite

# Coverage-guided fuzzing of the parsers (cargo-fuzz, nightly): every target in fuzz/ for
# FUZZ_SECONDS (default 60) each; fails when one finds a crash. See docs/dev/fuzzing.md.
fuzz: deps
	bash deploy/dev/fuzz.sh

clean-state:
	rm -rf data
