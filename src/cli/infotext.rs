//! A1111's generation parameters ("infotext"): the text `generate` writes into each PNG's `parameters`
//! chunk, which A1111's PNG Info tab, civitai and ComfyUI's A1111 importers read back.
//!
//! The layout is the one A1111's `modules/processing.py` (`create_infotext`) writes: the prompt, then
//! `Negative prompt: …` on its own line when there is one, then one line of `key: value` pairs joined by
//! `, `, each value quoted as A1111's `infotext_utils.quote` does (as JSON when it holds `,`, `:` or a
//! newline). A LoRA appears as A1111 users write one, a `<lora:NAME:WEIGHT>` tag after the prompt, and
//! in `Lora hashes` with the first 12 hex digits of its file's data hash (A1111's "addnet" hash,
//! [`lora::format::hashes::file_model_hash`]).

use sdxl_model::schedulers::SchedulerKind;

/// Everything an image's infotext says.
#[derive(Debug, Clone)]
pub struct Infotext<'a> {
    /// The image's prompt.
    pub prompt: &'a str,
    /// Its negative prompt, if any.
    pub negative: Option<&'a str>,
    /// Denoising steps.
    pub steps: usize,
    /// The sampler.
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// The generation's seed.
    pub seed: u64,
    /// Width and height in pixels.
    pub size: (i64, i64),
    /// The model's name (its folder's name).
    pub model: &'a str,
    /// Each LoRA: its name (file stem), weight and data hash (64 hex digits).
    pub loras: &'a [(String, f64, String)],
    /// Images per prompt, and this image's place among them (A1111's `Batch size`, `Batch pos`).
    pub batch: (i64, i64),
    /// More `key: value` pairs, written before `Version` (a grid's `Script`, `X Type`, `X Values`…).
    pub extra: &'a [(&'a str, String)],
}

/// A1111's quoting of a value: as it is, unless it holds `,`, `:` or a newline; then as a JSON string.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_owned())
    } else {
        value.to_owned()
    }
}

/// A number as Python prints a float (`5.0`, `0.7`).
fn python_float(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// A1111's sampler name and schedule type for our samplers.
fn sampler(kind: SchedulerKind) -> (&'static str, Option<&'static str>) {
    match kind {
        SchedulerKind::EulerDiscrete => ("Euler", None),
        SchedulerKind::EulerAncestralDiscrete => ("Euler a", None),
        SchedulerKind::Ddim => ("DDIM", None),
        SchedulerKind::DpmSolverMultistepKarras => ("DPM++ 2M", Some("Karras")),
        _ => ("DPM++ 2M", None),
    }
}

/// A name A1111 would accept inside a tag or a list: without `,` and `:` (as it strips model names).
fn bare(name: &str) -> String {
    name.replace([',', ':'], "")
}

impl Infotext<'_> {
    /// The text of the `parameters` chunk.
    pub fn render(&self) -> String {
        let mut prompt = self.prompt.to_owned();
        for (name, weight, _) in self.loras {
            prompt.push_str(&format!(" <lora:{}:{weight}>", bare(name)));
        }
        let (sampler, schedule) = sampler(self.scheduler);
        let mut params: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", sampler.to_owned()),
        ];
        if let Some(schedule) = schedule {
            params.push(("Schedule type", schedule.to_owned()));
        }
        params.extend([
            ("CFG scale", python_float(self.guidance)),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.size.0, self.size.1)),
            ("Model", bare(self.model)),
        ]);
        if self.batch.0 > 1 {
            params.push(("Batch size", self.batch.0.to_string()));
            params.push(("Batch pos", self.batch.1.to_string()));
        }
        if !self.loras.is_empty() {
            let hashes: Vec<String> = self
                .loras
                .iter()
                .map(|(name, _, hash)| format!("{}: {}", bare(name), &hash[..hash.len().min(12)]))
                .collect();
            params.push(("Lora hashes", hashes.join(", ")));
        }
        params.extend(self.extra.iter().map(|(key, value)| (*key, value.clone())));
        params.push((
            "Version",
            format!("sdxl-lora {}", env!("CARGO_PKG_VERSION")),
        ));
        let line = params
            .iter()
            .map(|(key, value)| format!("{key}: {}", quote(value)))
            .collect::<Vec<_>>()
            .join(", ");
        let negative = match self.negative {
            Some(text) if !text.is_empty() => format!("\nNegative prompt: {text}"),
            _ => String::new(),
        };
        format!("{prompt}{negative}\n{line}").trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_as_a1111_writes_it() {
        let loras = [("naruto, v2".to_owned(), 0.7, "0123456789abcdef".repeat(4))];
        let text = Infotext {
            prompt: "a fox, in the snow",
            negative: Some("blurry"),
            steps: 30,
            scheduler: SchedulerKind::DpmSolverMultistepKarras,
            guidance: 5.0,
            seed: 4,
            size: (1024, 768),
            model: "sdxl:base",
            loras: &loras,
            batch: (2, 1),
            extra: &[],
        }
        .render();
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            text,
            format!(
                "a fox, in the snow <lora:naruto v2:0.7>\nNegative prompt: blurry\nSteps: 30, \
                 Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 4, Size: 1024x768, \
                 Model: sdxlbase, Batch size: 2, Batch pos: 1, Lora hashes: \"naruto v2: 0123456789ab\", \
                 Version: sdxl-lora {version}"
            )
        );
        // No negative, no LoRA, one image: neither line nor keys appear.
        let plain = Infotext {
            prompt: "a cat",
            negative: None,
            steps: 2,
            scheduler: SchedulerKind::EulerAncestralDiscrete,
            guidance: 7.5,
            seed: 0,
            size: (64, 64),
            model: "tiny-sdxl",
            loras: &[],
            batch: (1, 0),
            extra: &[("X Values", "0, 1".into())],
        }
        .render();
        assert_eq!(
            plain,
            format!(
                "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 0, Size: 64x64, \
                 Model: tiny-sdxl, X Values: \"0, 1\", Version: sdxl-lora {version}"
            )
        );
    }
}
