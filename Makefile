# The two commands of the README. Both install what they need on first use (libtorch from PyPI).
.PHONY: test test-cpu-kernels demo lint library-user fixtures gpu-pack

# The whole test suite, then again under libtorch's plain and AVX2 CPU kernels, and the lint and
# documentation checks that keep main green.
test:
	scripts/with-torch.sh cargo test --workspace
	$(MAKE) test-cpu-kernels
	$(MAKE) lint
	$(MAKE) library-user

# The suite under libtorch's plain CPU kernels (`cargo test` above ran the machine's own, AVX-512 where
# it has it): every numeric bound comes from an error model and must hold on any x86-64 CPU, and seeded
# noise must not change (docs/NUMERICS.md). CAPS picks the kernel sets: CI repeats `default`, the scalar
# kernels, farthest from AVX-512; `make test-cpu-kernels CAPS="default avx2"` adds AVX2 (docs/NUMERICS.md
# tables all three). Same build as above, so nothing recompiles; the root package's tests of
# command-line behaviour and files, which no CPU kernel changes, run once (scripts/test-cpu-kernels.sh
# lists them).
CAPS ?= default
test-cpu-kernels:
	for cap in $(CAPS); do scripts/test-cpu-kernels.sh $$cap || exit 1; done

lint:
	cargo fmt --all -- --check
	scripts/with-torch.sh cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" scripts/with-torch.sh cargo doc --workspace --no-deps

# A program outside the workspace that depends on the crates by path (examples/library-user,
# docs/LIBRARY.md), built and run on the tiny fixtures on the CPU: generation with a LoRA, 5 training steps.
# It shares the workspace's target folder; its own feature set recompiles some dependencies once.
library-user:
	CARGO_TARGET_DIR=$${CARGO_TARGET_DIR:-$(CURDIR)/target} scripts/with-torch.sh \
		cargo run --locked --manifest-path examples/library-user/Cargo.toml
	cargo fmt --manifest-path examples/library-user/Cargo.toml -- --check

# The main job, offline: the seed recipe's trainer on the tiny preset (a tiny SDXL-shaped model and the demo
# dataset shipped in the repository), on the CPU in a few minutes. Outputs go to naruto-lora-tiny/.
# The full run is `scripts/with-torch.sh cargo run --release --example train_naruto` on a CUDA machine.
demo:
	scripts/with-torch.sh cargo run --release --example train_naruto -- --preset tiny

# Regenerates tests/fixtures with the pinned Python reference stack (tools/fixtures/README.md).
fixtures:
	tools/fixtures/regenerate.sh

# Builds release test binaries and gathers them for the GPU machine (docs/GPU.md).
gpu-pack:
	scripts/gpu-pack.sh
