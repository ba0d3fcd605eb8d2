//! The textual explanation: each optimized vector's nearest vocabulary tokens by cosine
//! similarity in the text encoder's token-embedding table, and the prompt the nearest ones
//! spell when put in the template's `{}`.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::clip_text::ClipTextModel;
use crate::tokenizer::ClipTokenizer;

/// One vocabulary token near a soft vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearToken {
    pub id: u32,
    /// The token as text ([`ClipTokenizer::decode_token`]).
    pub text: String,
    pub cosine: f64,
}

/// The explanation of a soft prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextualExplanation {
    /// For each soft vector, its nearest tokens, most similar first.
    pub nearest: Vec<Vec<NearToken>>,
    /// The template with the nearest token of each vector in place of `{}`.
    pub prompt: String,
}

impl std::fmt::Display for TextualExplanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "prompt: {}", self.prompt)?;
        for (j, near) in self.nearest.iter().enumerate() {
            let list: Vec<String> = near
                .iter()
                .map(|t| format!("{:?} {:.3}", t.text, t.cosine))
                .collect();
            writeln!(f, "  vector {j}: {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// The `top_k` nearest tokens of each row of `vectors` (`[k, d]`) among the text encoder's
/// token embeddings (`token_embedding`, `[vocab, d]`), by cosine similarity. Special tokens
/// (start / end of text) are left out: they cannot be typed into a prompt. When the model lists
/// its trained tokens ([`ClipTextModel::trained_tokens`], from its folder's
/// `trained_tokens.json`), only those are candidates: a model trained on a small corpus keeps
/// random embeddings for every other id, and those would be arbitrary neighbours.
pub fn nearest_tokens(
    template: &str,
    vectors: &Tensor,
    text_encoder: &ClipTextModel,
    tokenizer: &ClipTokenizer,
    top_k: usize,
) -> anyhow::Result<TextualExplanation> {
    nearest_tokens_among(
        template,
        vectors,
        &text_encoder.token_embedding,
        text_encoder.trained_tokens(),
        tokenizer,
        top_k,
    )
}

/// [`nearest_tokens`] over the rows of any `table` (`[vocab, d]`), among the ids `candidates`
/// (all when `None`; ids outside the table are an error).
pub fn nearest_tokens_among(
    template: &str,
    vectors: &Tensor,
    table: &Tensor,
    candidates: Option<&[u32]>,
    tokenizer: &ClipTokenizer,
    top_k: usize,
) -> anyhow::Result<TextualExplanation> {
    let (k, d) = vectors.dims2()?;
    let (vocab, td) = table.dims2()?;
    if d != td {
        anyhow::bail!(
            "the soft prompt's vectors have width {d} but the token-embedding table has width {td}: \
             the prompt was optimized for another text encoder"
        )
    }
    if top_k == 0 {
        anyhow::bail!("top_k must be at least 1")
    }
    if let Some(&id) = candidates
        .unwrap_or_default()
        .iter()
        .find(|&&id| id as usize >= vocab)
    {
        anyhow::bail!("candidate token id {id} is outside the token-embedding table ({vocab} rows)")
    }
    let pool: Vec<usize> = match candidates {
        Some(ids) => ids.iter().map(|&i| i as usize).collect(),
        None => (0..vocab).collect(),
    };
    let pool: Vec<usize> = pool
        .into_iter()
        .filter(|&i| !tokenizer.is_special(i as u32))
        .collect();
    if pool.is_empty() {
        anyhow::bail!("no candidate tokens: every listed trained token is a special token")
    }
    let unit = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let norm = t.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        t.broadcast_div(&norm)
    };
    // [k, vocab] cosines.
    let cos: Vec<Vec<f32>> = unit(vectors)?.matmul(&unit(table)?.t()?)?.to_vec2()?;
    let mut nearest = Vec::with_capacity(k);
    for row in cos {
        let mut order = pool.clone();
        let n = top_k.min(order.len());
        order.select_nth_unstable_by(n.saturating_sub(1), |&a, &b| row[b].total_cmp(&row[a]));
        order.truncate(n);
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        nearest.push(
            order
                .into_iter()
                .map(|i| NearToken {
                    id: i as u32,
                    text: tokenizer
                        .decode_token(i as u32)
                        .unwrap_or_else(|| format!("<id {i}>")),
                    cosine: row[i] as f64,
                })
                .collect::<Vec<_>>(),
        );
    }
    let ids: Vec<u32> = nearest
        .iter()
        .filter_map(|n| n.first())
        .map(|t| t.id)
        .collect();
    let words = tokenizer.decode(&ids);
    let prompt = template.replacen("{}", &words, 1);
    Ok(TextualExplanation { nearest, prompt })
}
