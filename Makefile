# The two commands of the README. Both install what they need on first use (libtorch from PyPI).
.PHONY: test demo lint fixtures gpu-pack

# The whole test suite, plus the lint and documentation checks that keep main green.
test:
	scripts/with-torch.sh cargo test --workspace
	$(MAKE) lint

lint:
	cargo fmt --all -- --check
	scripts/with-torch.sh cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" scripts/with-torch.sh cargo doc --workspace --no-deps

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
