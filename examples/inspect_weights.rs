//! Lists the tensors of a safetensors file: key, dtype, shape, and the total parameter count.
//!
//! ```sh
//! cargo run --release --example inspect_weights -- tests/fixtures/tiny-sdxl/unet/diffusion_pytorch_model.safetensors
//! ```

use anyhow::Context;
use sdxl_model::weights::TensorFile;
use tch::Device;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: inspect_weights FILE.safetensors")?;
    let file = TensorFile::open(&path)?;
    let mut total = 0i64;
    for key in file.keys()? {
        let tensor = file.tensor(&key, Device::Cpu, None)?;
        total += tensor.numel() as i64;
        println!("{key}\t{:?}\t{:?}", tensor.kind(), tensor.size());
    }
    println!("{} tensors, {total} elements", file.keys()?.len());
    Ok(())
}
