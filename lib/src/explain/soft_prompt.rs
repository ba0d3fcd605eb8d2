//! The soft prompt: `k` learnable vectors in the CLIP token-embedding space, standing where the
//! placeholder `{}` stands in a template (`"{}"`, `"A texture of {}"`, `"A shape of {}"`, or any
//! text). DiffExplainer optimizes these vectors; the rest of the prompt stays fixed text.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};

use crate::models::clip_text::{ClipTextModel, ClipTextOutput};
use crate::rng::SeededRng;
use crate::tokenizer::ClipTokenizer;

/// How the vectors start.
#[derive(Debug, Clone, PartialEq)]
pub enum SoftPromptInit {
    /// From a word's token embeddings: if the word is `k` tokens, vector `j` starts at token
    /// `j`'s embedding; otherwise every vector starts at the mean of the word's tokens.
    Word(String),
    /// Random directions scaled to the vocabulary's mean embedding norm (so the vectors start
    /// where real tokens live), drawn from `seed`.
    Random { seed: u64 },
}

/// A template and its learnable vectors.
pub struct SoftPrompt {
    template: String,
    vectors: Var,
}

/// What the text encoder needs: the prompt's ids with the soft positions marked.
#[derive(Debug, Clone)]
pub struct PromptIds {
    /// `[1, 77]` ids; the soft positions hold `placeholder_id`.
    pub ids: Tensor,
    /// An id that occurs nowhere else in the prompt, so the splice finds exactly `k` of it.
    pub placeholder_id: u32,
}

impl SoftPrompt {
    /// `k` vectors for `template` (which must contain `{}` once), initialized by `init`.
    pub fn new(
        template: &str,
        k: usize,
        init: &SoftPromptInit,
        tokenizer: &ClipTokenizer,
        text_model: &ClipTextModel,
    ) -> anyhow::Result<Self> {
        if k == 0 {
            anyhow::bail!("a soft prompt needs at least one vector (k = 0)")
        }
        // Validate the template now rather than at the first iteration.
        tokenizer.encode_template(template, k, text_model.config().max_position_embeddings)?;
        let table = &text_model.token_embedding;
        let dim = table.dim(1)?;
        let vectors = match init {
            SoftPromptInit::Word(word) => {
                let ids = tokenizer.encode(word)?;
                // Strip start/end tokens.
                let ids: Vec<u32> = ids
                    .into_iter()
                    .filter(|&i| i != tokenizer.bos_id() && i != tokenizer.eos_id())
                    .collect();
                if ids.is_empty() {
                    anyhow::bail!("soft prompt init word `{word}` has no tokens")
                }
                let rows = table.index_select(&Tensor::new(ids.as_slice(), table.device())?, 0)?;
                if ids.len() == k {
                    rows
                } else {
                    rows.mean_keepdim(0)?.repeat((k, 1))?
                }
            }
            SoftPromptInit::Random { seed } => {
                let mean_norm = table
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum(1)?
                    .sqrt()?
                    .mean_all()?
                    .to_scalar::<f32>()?;
                let dirs = SeededRng::new(*seed).normal((k, dim), DType::F32, table.device())?;
                let norms = dirs.sqr()?.sum_keepdim(1)?.sqrt()?;
                (dirs.broadcast_div(&norms)? * mean_norm as f64)?
            }
        };
        Ok(Self {
            template: template.to_string(),
            vectors: Var::from_tensor(&vectors.to_dtype(DType::F32)?.contiguous()?)?,
        })
    }

    /// Wraps existing vectors `[k, d]`.
    pub fn from_vectors(template: &str, vectors: &Tensor) -> anyhow::Result<Self> {
        let (k, _) = vectors
            .dims2()
            .context("soft prompt vectors must be [k, d]")?;
        if k == 0 {
            anyhow::bail!("a soft prompt needs at least one vector (k = 0)")
        }
        if !template.contains("{}") {
            anyhow::bail!("template `{template}` has no `{{}}` placeholder for the soft prompt")
        }
        Ok(Self {
            template: template.to_string(),
            vectors: Var::from_tensor(&vectors.to_dtype(DType::F32)?)?,
        })
    }

    pub fn template(&self) -> &str {
        &self.template
    }
    pub fn num_vectors(&self) -> usize {
        self.vectors.dim(0).unwrap_or(0)
    }
    /// The learnable vectors `[k, d]`, f32 (the optimizer's parameter).
    pub fn vectors(&self) -> &Var {
        &self.vectors
    }

    /// The prompt's token ids on `device`, soft positions marked by a placeholder id.
    pub fn prompt_ids(
        &self,
        tokenizer: &ClipTokenizer,
        max_len: usize,
        device: &Device,
    ) -> anyhow::Result<PromptIds> {
        prompt_ids(
            &self.template,
            self.num_vectors(),
            tokenizer,
            max_len,
            device,
        )
    }

    /// Runs the text encoder on the template with the soft vectors spliced in: the conditioning
    /// is `last_hidden_state` (`[1, 77, d]`), differentiable with respect to [`Self::vectors`].
    pub fn encode(
        &self,
        tokenizer: &ClipTokenizer,
        text_model: &ClipTextModel,
    ) -> anyhow::Result<ClipTextOutput> {
        encode_vectors(
            &self.template,
            self.vectors.as_tensor(),
            tokenizer,
            text_model,
        )
    }

    /// Saves the vectors (`soft_prompt`, `[k, d]` f32) and the template (metadata) as safetensors.
    pub fn save(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let vectors = self.vectors.as_tensor().to_device(&Device::Cpu)?;
        let data: Vec<f32> = vectors.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vectors.dims().to_vec(),
            &bytes,
        )?;
        let metadata = HashMap::from([("template".to_string(), self.template.clone())]);
        crate::io::write_atomically(path, |file| {
            safetensors::serialize_to_file([("soft_prompt", view)], Some(metadata), file)
                .map_err(Into::into)
        })
    }

    /// Loads a soft prompt saved by [`Self::save`].
    pub fn load(path: impl AsRef<Path>, device: &Device) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read soft prompt", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let template = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("template").cloned())
            .with_context(|| format!("{}: no `template` in the file's metadata", path.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        let vectors = tensors
            .get("soft_prompt")
            .with_context(|| format!("{}: no tensor `soft_prompt`", path.display()))?;
        Self::from_vectors(&template, vectors).with_context(|| format!("{}", path.display()))
    }
}

/// The token ids of `template` with `k` soft positions on `device`, marked by a placeholder id.
pub fn prompt_ids(
    template: &str,
    k: usize,
    tokenizer: &ClipTokenizer,
    max_len: usize,
    device: &Device,
) -> anyhow::Result<PromptIds> {
    let template = tokenizer.encode_template(template, k, max_len)?;
    let mut ids = template.ids;
    let placeholder_id = (0u32..)
        .find(|candidate| {
            !ids.iter()
                .enumerate()
                .any(|(p, id)| id == candidate && !template.slots.contains(&p))
        })
        .expect("a prompt of 77 ids leaves some id unused");
    ids[template.slots.clone()]
        .iter_mut()
        .for_each(|id| *id = placeholder_id);
    let len = ids.len();
    Ok(PromptIds {
        ids: Tensor::from_vec(ids, (1, len), device)?,
        placeholder_id,
    })
}

/// [`SoftPrompt::encode`] for any vectors `[k, d]` (any float dtype, e.g. f64 for a
/// finite-difference check): they are cast to the text model's dtype and spliced in, so the
/// output is differentiable with respect to `vectors` itself.
pub fn encode_vectors(
    template: &str,
    vectors: &Tensor,
    tokenizer: &ClipTokenizer,
    text_model: &ClipTextModel,
) -> anyhow::Result<ClipTextOutput> {
    let (k, _) = vectors
        .dims2()
        .context("soft prompt vectors must be [k, d]")?;
    let table = &text_model.token_embedding;
    let prompt = prompt_ids(
        template,
        k,
        tokenizer,
        text_model.config().max_position_embeddings,
        table.device(),
    )?;
    let tokens = text_model.embed_tokens(&prompt.ids)?;
    let soft = vectors
        .to_dtype(tokens.dtype())?
        .to_device(tokens.device())?;
    let embeds = text_model.splice(&tokens, &prompt.ids, prompt.placeholder_id, &soft)?;
    Ok(text_model.forward_embeds(&embeds, &prompt.ids)?)
}
