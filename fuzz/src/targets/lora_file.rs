//! A LoRA file (`.safetensors` in the diffusers, peft or kohya layout, with its header metadata)
//! read as `generate --lora` and `lora_convert` read it, then placed onto the tiny SDXL pipeline
//! (`tests/fixtures/tiny-sdxl`: its UNet and both text encoders) as adapter `fuzz`, scaled, and
//! taken off again so the next input meets the same model. The pipeline is loaded once.

use std::path::Path;

use super::{Outcome, Runner, put, text};
use lora::HasLinears;
use lora::format::{ReadOptions, read, summary};
use sdxl_model::pipeline::Pipeline;
use sdxl_model::pretrained::LoadOptions;

const ADAPTER: &str = "fuzz";

pub(super) fn runner(fixtures: &Path, work: &Path) -> Result<Runner, String> {
    let mut pipe = Pipeline::from_pretrained(fixtures.join("tiny-sdxl"), &LoadOptions::default())
        .map_err(text)?
        .model;
    let names = pipe.lora_module_names();
    let work = work.to_owned();
    Ok(Box::new(move |data: &[u8]| -> Outcome {
        let path = put(&work, "lora.safetensors", data)?;
        summary(&path).map_err(text)?;
        let options = ReadOptions::default()
            .with_module_names(Some(&names))
            .with_block_renames(None);
        let file = read(&path, options).map_err(text)?;
        let placed = pipe.load_lora(&file.state, ADAPTER).map_err(text);
        let scaled = placed.and_then(|_| pipe.set_lora_multiplier(ADAPTER, 0.5).map_err(text));
        remove_adapters(pipe.unet_mut())?;
        let (first, second) = pipe.prompt_encoder_mut().text_encoders_mut();
        remove_adapters(first)?;
        remove_adapters(second)?;
        scaled
    }))
}

/// Takes adapter [`ADAPTER`] off every layer of `model` that has it.
fn remove_adapters(model: &mut dyn HasLinears) -> Outcome {
    let mut result = Ok(());
    model.for_each_linear(&mut |path, layer| {
        if layer.adapter(ADAPTER).is_some()
            && let Err(e) = layer.remove_adapter(path, ADAPTER)
        {
            result = Err(text(e));
        }
    });
    model.for_each_conv(&mut |path, layer| {
        if layer.adapter(ADAPTER).is_some()
            && let Err(e) = layer.remove_adapter(path, ADAPTER)
        {
            result = Err(text(e));
        }
    });
    result
}
