//! The conditioning of a micro-step's prompts: gathered from the prompt table, or, with
//! `--train_text_encoder`, encoded inside the step by the text encoders being trained from the
//! table's token ids (device work only, so the step stays capturable).

use sdxl_model::prompt::PromptEmbeds;

use super::{StepInputs, StepSettings};
use crate::model::{CheckpointedText, TextEncoders};
use crate::prepare::{PromptTable, TextConditioning};
use crate::{Error, Result};

/// The batch's prompt embeddings: rows of the prompt table, or, with trained text encoders, the
/// encoders run on the rows' token ids (with autograd, or checkpointed when the step is: then the
/// second value back-propagates through them).
pub(super) fn conditioning<'m>(
    encoders: Option<&'m TextEncoders>,
    text: &TextConditioning,
    inputs: &StepInputs,
    settings: &StepSettings,
) -> Result<(PromptEmbeds, Option<CheckpointedText<'m>>)> {
    let rows = &inputs.prompt_rows;
    match (&text.table, encoders) {
        (PromptTable::Embeddings { context, pooled }, _) => Ok((
            PromptEmbeds {
                context: context.f_index_select(0, rows)?,
                pooled: pooled.f_index_select(0, rows)?,
            },
            None,
        )),
        (PromptTable::TokenIds { ids, ids_2 }, Some(encoders)) => {
            let (ids, ids_2) = (ids.f_index_select(0, rows)?, ids_2.f_index_select(0, rows)?);
            if settings.gradient_checkpointing {
                let forward = encoders.encode_checkpointed(&ids, &ids_2)?;
                let embeds = PromptEmbeds {
                    context: forward.embeds.context.shallow_clone(),
                    pooled: forward.embeds.pooled.shallow_clone(),
                };
                Ok((embeds, Some(forward)))
            } else {
                Ok((encoders.encode(&ids, &ids_2)?, None))
            }
        }
        (PromptTable::TokenIds { .. }, None) => Err(Error::InvalidOption {
            option: "--train_text_encoder",
            problem: "the prompt table holds token ids but no text encoders were loaded".into(),
        }),
    }
}
