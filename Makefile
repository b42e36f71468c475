# The two commands of the README. Both install what they need on first use (libtorch from PyPI).
.PHONY: test test-numerics demo lint fixtures gpu-pack

# The whole test suite, the numeric tests again under libtorch's other CPU kernels, and the lint and
# documentation checks that keep main green.
test:
	scripts/with-torch.sh cargo test --workspace
	$(MAKE) test-numerics
	$(MAKE) lint

# The tests that compare numbers with the reference libraries, under libtorch's plain and AVX2 CPU
# kernels (`cargo test` above ran the machine's own, AVX-512 where it has it): their bounds come from
# an error model and must hold on any x86-64 CPU (docs/NUMERICS.md).
NUMERIC_CRATES = -p sdxl-model -p lora -p optim8bit -p torch-cuda
NUMERIC_ROOT_TESTS = --test objective --test torch_ops --test lora_tiny_sdxl
test-numerics:
	for cap in default avx2; do \
		echo "ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap scripts/with-torch.sh cargo test $(NUMERIC_CRATES) --tests || exit 1; \
		ATEN_CPU_CAPABILITY=$$cap scripts/with-torch.sh cargo test -p sdxl-lora $(NUMERIC_ROOT_TESTS) || exit 1; \
	done

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
