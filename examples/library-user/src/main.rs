//! Generation and training from Rust, as a project depending on the crates would write them
//! (docs/LIBRARY.md shows the same two functions). It runs on the repository's tiny SDXL-shaped
//! model and demo dataset on the CPU; give a diffusers SDXL folder and your own dataset instead.

use std::error::Error;
use std::path::Path;

use sdxl_model::pipeline::{GenerateOptions, Pipeline};
use sdxl_model::pretrained::LoadOptions;
use trainer::{TrainConfig, Trainer};

/// Loads a pipeline, generates an image, applies a LoRA and generates it again.
fn generate(model: &Path, lora_file: &Path, out: &Path) -> Result<(), Box<dyn Error>> {
    // The CPU in fp32 by default; a hub id such as "stabilityai/stable-diffusion-xl-base-1.0" works too.
    let mut pipe = Pipeline::from_pretrained(model, &LoadOptions::default())?.model;
    let options = GenerateOptions::default()
        .with_prompts(vec!["a watercolor painting of a fox in the snow".into()])
        .with_steps(2)
        .with_height(64)
        .with_width(64)
        .with_seed(7);
    let base = pipe.generate(&options)?;
    let file = lora::format::read(lora_file, Default::default())?;
    pipe.load_lora(&file.state, "style")?;
    pipe.set_lora_multiplier("style", 0.8)?;
    let styled = pipe.generate(&options)?;
    if base.to_rgb(0)? == styled.to_rgb(0)? {
        return Err("the LoRA changed nothing".into());
    }
    styled.save_png(0, out.join("fox.png"))?;
    Ok(())
}

/// Trains a LoRA for 5 steps and returns the diffusers-format file it wrote.
fn train(model: &Path, dataset: &Path, out: &Path) -> Result<std::path::PathBuf, Box<dyn Error>> {
    let config = TrainConfig::tiny_demo(model, dataset, out)
        .with_max_train_steps(5)
        .with_checkpointing_steps(5)
        .with_validation_prompt(None);
    let summary = Trainer::new(config)?.run()?;
    println!(
        "trained {} steps, losses {:?}",
        summary.steps_run, summary.loss_history
    );
    Ok(summary.lora_file)
}

fn main() -> Result<(), Box<dyn Error>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixtures = repo.join("tests/fixtures");
    let out = std::env::temp_dir().join(format!("library-user-{}", std::process::id()));
    std::fs::create_dir_all(&out)?;
    let model = fixtures.join("tiny-sdxl");
    generate(
        &model,
        &fixtures.join("lora/tiny-sdxl-diffusers.safetensors"),
        &out,
    )?;
    let trained = train(
        &model,
        &repo.join("examples/data/tiny-naruto"),
        &out.join("run"),
    )?;
    // The LoRA just trained loads into a fresh pipeline and changes its image.
    generate(&model, &trained, &out)?;
    println!(
        "wrote {} and {}",
        out.join("fox.png").display(),
        trained.display()
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
