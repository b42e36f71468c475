//! Prompts into both SDXL tokenizers (`tokenizer`, `tokenizer_2`): the text a user passes to
//! `--prompt`, `--validation_prompt`, `--instance_prompt` or a caption. Bytes that are not UTF-8
//! are read as the lossy string a caption file would give.

use super::{Outcome, Runner, defect, text};
use sdxl_model::tokenizer::{ClipTokenizer, MAX_LENGTH};
use tch::Device;

pub(super) fn runner() -> Result<Runner, String> {
    let first = ClipTokenizer::sdxl_first().map_err(text)?;
    let second = ClipTokenizer::sdxl_second().map_err(text)?;
    Ok(Box::new(move |data: &[u8]| -> Outcome {
        let prompt = String::from_utf8_lossy(data);
        for tokenizer in [&first, &second] {
            let ids = tokenizer.encode(&prompt).map_err(text)?;
            if ids.len() != MAX_LENGTH {
                defect("a prompt's ids are not MAX_LENGTH long");
            }
        }
        // A batch: the prompt and its lines, as a file of prompts gives them.
        let lines: Vec<&str> = prompt.lines().take(4).collect();
        let batch = first.encode_batch(&lines, Device::Cpu).map_err(text)?;
        if batch.size() != [lines.len() as i64, MAX_LENGTH as i64] {
            defect("a batch of prompts has the wrong shape");
        }
        Ok(())
    }))
}
