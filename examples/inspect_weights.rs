//! Lists the tensors of a safetensors file: key, dtype, shape, and the total parameter count.
//!
//! ```sh
//! cargo run --release --example inspect_weights -- tests/fixtures/tiny-sdxl/unet/diffusion_pytorch_model.safetensors
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sdxl_model::weights::TensorFile;
use tch::Device;

mod cli;

/// Lists the tensors of a safetensors file: key, dtype, shape, and the total parameter count.
#[derive(Parser)]
#[command(name = "inspect_weights")]
struct Args {
    /// The safetensors file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

fn main() -> ExitCode {
    cli::run(inspect)
}

fn inspect(args: Args) -> anyhow::Result<()> {
    let file = TensorFile::open(&args.file)?;
    let mut total = 0i64;
    for key in file.keys()? {
        let tensor = file.tensor(&key, Device::Cpu, None)?;
        total += tensor.numel() as i64;
        println!("{key}\t{:?}\t{:?}", tensor.kind(), tensor.size());
    }
    println!("{} tensors, {total} elements", file.keys()?.len());
    Ok(())
}
