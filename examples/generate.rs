//! Text to image with an SDXL diffusers folder, optionally with LoRAs stacked at chosen weights;
//! `--compare` writes one grid, the base model's image on the left and the image with every LoRA on
//! the right, for the same prompts and seeds; `--lora_weights` one labelled grid of seeds × LoRA
//! weights.
//!
//! ```sh
//! cargo run --release --example generate -- --model path/to/sdxl --prompt "a fox in the snow" \
//!     [--negative "blurry"] [--steps 30] [--guidance 5] [--width 1024 --height 1024] [--seed 0] \
//!     [--scheduler euler|euler_a|ddim|dpm++2m] [--kind bf16|f16|f32] [--vae_fp32] [--tile] \
//!     [--num_images_per_prompt N | --num_images N [--batch_size B]] \
//!     [--lora a.safetensors[:0.7] --lora b.safetensors[:0.4] ... [--lora_scale 1.0] \
//!      [--compare | --lora_weights 0,0.4,0.7,1]] \
//!     [--cuda_graph] [--warmup] [--out output.png]
//! cargo run --release --example generate -- --help       # every flag, with its default
//! ```
//!
//! The same command as `sdxl-lora generate` (`src/cli/generate.rs`).

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    cli::run(sdxl_lora::cli::generate::generate)
}
