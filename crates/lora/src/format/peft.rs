//! The peft layout as diffusers stores it: `get_peft_model_state_dict` keys with the component
//! prefix, `<component>.<module>.lora_A.weight` `[r, in]`, `<component>.<module>.lora_B.weight`
//! `[out, r]`, DoRA's `<component>.<module>.lora_magnitude_vector` `[out]`, and the adapter
//! configuration (rank, alpha, targets, patterns) in the `lora_adapter_metadata` header entry.

use super::Part;
use crate::state::Component;

const SUFFIXES: [(&str, Part); 3] = [
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_magnitude_vector", Part::Magnitude),
];

/// Whether `key` uses one of peft's suffixes (not counting the magnitude, which diffusers shares).
pub(crate) fn is_peft_key(key: &str) -> bool {
    SUFFIXES[..2]
        .iter()
        .any(|(suffix, _)| key.ends_with(suffix))
}

/// The component, module path and part of a peft key.
pub(crate) fn place(key: &str) -> Option<(Component, String, Part)> {
    let (component, rest) = Component::split_diffusers_key(key)?;
    SUFFIXES.iter().find_map(|(suffix, part)| {
        rest.strip_suffix(suffix)
            .filter(|m| !m.is_empty())
            .map(|module| (component, module.to_owned(), *part))
    })
}

/// The key of `part` of `module` (`None` for alpha, which lives in the metadata).
pub(crate) fn key(component: Component, module: &str, part: Part) -> Option<String> {
    let prefix = component.diffusers_prefix();
    match part {
        Part::Down => Some(format!("{prefix}.{module}.lora_A.weight")),
        Part::Up => Some(format!("{prefix}.{module}.lora_B.weight")),
        Part::Magnitude => Some(format!("{prefix}.{module}.lora_magnitude_vector")),
        Part::Alpha => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_place_back() {
        let module = "text_model.encoder.layers.0.self_attn.q_proj";
        for part in [Part::Down, Part::Up, Part::Magnitude] {
            let key = key(Component::TextEncoder, module, part).unwrap();
            assert_eq!(
                place(&key),
                Some((Component::TextEncoder, module.to_owned(), part)),
                "{key}"
            );
        }
        assert_eq!(
            key(Component::Unet, "to_q", Part::Down).unwrap(),
            "unet.to_q.lora_A.weight"
        );
        assert!(is_peft_key("unet.a.lora_B.weight") && !is_peft_key("unet.a.lora.up.weight"));
    }
}
