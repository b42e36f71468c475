//! The diffusers LoRA layout: what `train_dreambooth_lora_sdxl.py` writes through
//! `convert_state_dict_to_diffusers` and `save_lora_weights`, and what `load_lora_weights` reads.
//!
//! - UNet: `unet.<module>.lora.down.weight` `[r, in]`, `unet.<module>.lora.up.weight` `[out, r]`;
//! - text encoders: `text_encoder(_2).<module>.lora_linear_layer.{down,up}.weight`;
//! - DoRA: `<component>.<module>.lora_magnitude_vector` `[out]`;
//! - no alpha tensors: alpha comes from the `lora_adapter_metadata` header entry, else alpha = r.

use super::Part;
use crate::state::Component;

/// `(suffix, part)` pairs this layout uses. Both infixes are accepted for every component when
/// reading, as diffusers' own loader and ComfyUI do.
const SUFFIXES: [(&str, Part); 5] = [
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora_magnitude_vector", Part::Magnitude),
];

/// Whether `key` uses one of this layout's suffixes.
pub(crate) fn is_diffusers_key(key: &str) -> bool {
    SUFFIXES.iter().any(|(suffix, _)| key.ends_with(suffix))
}

/// The component, module path and part of a diffusers key.
pub(crate) fn place(key: &str) -> Option<(Component, String, Part)> {
    let (component, rest) = Component::split_diffusers_key(key)?;
    SUFFIXES.iter().find_map(|(suffix, part)| {
        rest.strip_suffix(suffix)
            .filter(|m| !m.is_empty())
            .map(|module| (component, module.to_owned(), *part))
    })
}

/// The key diffusers writes for `part` of `module` (`None` for alpha, which it does not store).
pub(crate) fn key(component: Component, module: &str, part: Part) -> Option<String> {
    let infix = match component {
        Component::Unet => "lora",
        Component::TextEncoder | Component::TextEncoder2 => "lora_linear_layer",
    };
    let prefix = component.diffusers_prefix();
    match part {
        Part::Down => Some(format!("{prefix}.{module}.{infix}.down.weight")),
        Part::Up => Some(format!("{prefix}.{module}.{infix}.up.weight")),
        Part::Magnitude => Some(format!("{prefix}.{module}.lora_magnitude_vector")),
        Part::Alpha => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_what_the_sdxl_scripts_write_and_place_back() {
        let unet = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
        let down = key(Component::Unet, unet, Part::Down).unwrap();
        assert_eq!(down, format!("unet.{unet}.lora.down.weight"));
        assert_eq!(
            place(&down),
            Some((Component::Unet, unet.to_owned(), Part::Down))
        );
        let te = "text_model.encoder.layers.31.self_attn.out_proj";
        let up = key(Component::TextEncoder2, te, Part::Up).unwrap();
        assert_eq!(
            up,
            format!("text_encoder_2.{te}.lora_linear_layer.up.weight")
        );
        assert_eq!(
            place(&up),
            Some((Component::TextEncoder2, te.to_owned(), Part::Up))
        );
        assert_eq!(key(Component::Unet, unet, Part::Alpha), None);
        assert_eq!(place("vae.decoder.lora.up.weight"), None);
        assert_eq!(place("unet.lora.up.weight"), None);
    }
}
