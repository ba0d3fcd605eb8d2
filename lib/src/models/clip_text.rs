//! The CLIP text encoder (transformers' `CLIPTextModel`), driven by input embeddings so that a
//! soft prompt can be optimized through it.
//!
//! Stable Diffusion conditions its UNet on this encoder's `last_hidden_state` (SD 1.x: OpenAI
//! CLIP ViT-L/14, `hidden_act = "quick_gelu"`; SD 2.x: OpenCLIP ViT-H, `"gelu"`, whose
//! `text_encoder` checkpoint already stops one layer short, 23 of 24). DiffExplainer learns a few
//! token embeddings — the soft prompt — in the encoder's input space, so the gradient of the
//! classifier's logit must reach those embeddings through the whole encoder. Every op here
//! records a backward (our [`crate::ops`] norms and attention, `Linear` matmuls,
//! `index_select`), so it does.
//!
//! The soft-prompt path is three calls:
//!
//! ```text
//! let tokens = model.embed_tokens(&ids)?;                        // [b, s, d]
//! let embeds = model.splice(&tokens, &ids, placeholder, soft.as_tensor())?;
//! let out = model.forward_embeds(&embeds, &ids)?;                // last / penultimate / pooled
//! ```
//!
//! **Placeholder convention** ([`ClipTextModel::splice`]): the prompt's token ids hold a chosen
//! placeholder id (any id in the vocabulary, e.g. a rare token or one added for the purpose)
//! exactly `k` times in every row, where `k` is the number of soft-prompt vectors; the `j`-th
//! placeholder of a row (left to right) is replaced by soft vector `j`. The placeholders need not
//! be consecutive. Every row of a batch receives the same soft prompt. A row with a different
//! count is an error naming the row, the count and `k`.
//!
//! **Pooling** follows transformers 5.24 exactly: when the config's `eos_token_id` is the legacy
//! value 2 (e.g. SD 1.x's `text_encoder/config.json`), the pooled position is the argmax of the
//! ids (the first highest id: the tokenizer's end-of-text 49407); otherwise it is the first
//! position whose id equals `eos_token_id`. Where transformers would silently pool position 0 of
//! a row without that id, we return an error instead: pooling the BOS state would cut the
//! soft prompt's gradient without a sound.
//!
//! Parameter names are transformers' (`text_model.embeddings.token_embedding.weight`,
//! `text_model.encoder.layers.{i}.self_attn.q_proj.weight`, ...); a checkpoint with or without
//! the leading `text_model.` loads. Parity: `tests/parity/cases/clip_text_*` (kind `clip_text`).

use std::path::Path;

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer};

use super::clip_encoder::{ClipEncoderLayer, LayerDims};
use crate::ops::{Activation, AttentionMask, LayerNorm};

/// transformers' `CLIPTextConfig`, with its defaults for absent fields. Unknown fields are
/// ignored. Public fields, so a tiny configuration can be written in code.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// `"quick_gelu"` (OpenAI CLIP, SD 1.x) or `"gelu"` (OpenCLIP, SD 2.x); other names of
    /// [`Activation`] parse too.
    #[serde(
        default = "defaults::hidden_act",
        deserialize_with = "deserialize_hidden_act"
    )]
    pub hidden_act: Activation,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "defaults::bos_token_id")]
    pub bos_token_id: Option<u32>,
    /// Decides the pooled position (see the module doc). A one-element list is accepted.
    #[serde(
        default = "defaults::eos_token_id",
        deserialize_with = "deserialize_eos"
    )]
    pub eos_token_id: Option<u32>,
    /// Width of `text_projection` in `CLIPTextModelWithProjection` (unused by this module).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

mod defaults {
    use crate::ops::Activation;
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> Activation {
        Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn pad_token_id() -> Option<u32> {
        Some(1)
    }
    pub fn bos_token_id() -> Option<u32> {
        Some(49406)
    }
    pub fn eos_token_id() -> Option<u32> {
        Some(49407)
    }
}

pub(crate) fn deserialize_hidden_act<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Activation, D::Error> {
    let name = String::deserialize(d)?;
    serde_json::from_value(serde_json::Value::String(name.clone())).map_err(|_| {
        serde::de::Error::custom(format!(
            "unknown hidden_act `{name}` (CLIP towers use \"quick_gelu\" or \"gelu\"; \
             also supported: \"gelu_new\", \"gelu_pytorch_tanh\", \"silu\", \"relu\")"
        ))
    })
}

fn deserialize_eos<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Eos {
        One(u32),
        Many(Vec<u32>),
    }
    match Option::<Eos>::deserialize(d)? {
        None => Ok(None),
        Some(Eos::One(id)) => Ok(Some(id)),
        Some(Eos::Many(ids)) if ids.len() == 1 => Ok(Some(ids[0])),
        Some(Eos::Many(ids)) => Err(serde::de::Error::custom(format!(
            "eos_token_id {ids:?}: a CLIP text encoder pools at one end-of-text id, not several"
        ))),
    }
}

impl ClipTextConfig {
    /// Parses a `CLIPTextConfig` JSON value, or a full `CLIPConfig` whose `text_config` holds it.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let value = match value.get("text_config") {
            Some(text @ serde_json::Value::Object(_)) => text.clone(),
            _ => value,
        };
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| candle_core::Error::Msg(format!("CLIP text config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a `config.json` (an SD repository's `text_encoder/config.json`, or a CLIP model's).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::pretrained::read_config(path, Self::from_value)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The sizes of one encoder layer.
    pub fn layer_dims(&self) -> LayerDims {
        LayerDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "CLIP text config: hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            )
        }
        Ok(())
    }
}

/// The encoder's outputs. `last_hidden_state` is what SD 1.x's UNet cross-attends to.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// Final-LayerNorm states, `[b, s, d]`.
    pub last_hidden_state: Tensor,
    /// The input of the last encoder layer (transformers' `hidden_states[-2]`, no final LN),
    /// `[b, s, d]`: diffusers' `clip_skip = 1` takes this, then applies the final LayerNorm.
    pub penultimate_hidden_state: Tensor,
    /// `last_hidden_state` at each row's end-of-text position, `[b, d]`.
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModel` (no projection head).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    /// `[vocab_size, d]`.
    pub token_embedding: Tensor,
    /// `[max_position_embeddings, d]`.
    pub position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
    /// The ids whose embeddings were trained (sorted), when the model folder says so in
    /// [`TRAINED_TOKENS_FILE`]; `None`: every id (a real CLIP checkpoint).
    trained_tokens: Option<Vec<u32>>,
}

/// Beside a text encoder's `config.json`: the token ids its training saw, for a model trained on
/// a small corpus (the ShapesWorld CLIP, `world::clip`). Not a transformers file; transformers
/// ignores it. JSON: `{"token_ids": [ids, sorted], "tokens": [the vocabulary entries], ...}`.
/// Nearest-token explanations search only these ids ([`crate::explain::nearest_tokens`]): the
/// embeddings of ids never seen keep their random initialization and would otherwise be
/// arbitrary neighbours.
pub const TRAINED_TOKENS_FILE: &str = "trained_tokens.json";

/// Reads `text_encoder_dir/`[`TRAINED_TOKENS_FILE`]: `None` when absent; an error naming the
/// file when it is unreadable, empty, or holds an id outside `0..vocab_size`.
pub fn read_trained_tokens(text_encoder_dir: &Path, vocab_size: usize) -> Result<Option<Vec<u32>>> {
    let path = text_encoder_dir.join(TRAINED_TOKENS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct File {
        token_ids: Vec<u32>,
    }
    let bad = |what: String| candle_core::Error::Msg(format!("{}: {what}", path.display()));
    let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let file: File = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("expected {{\"token_ids\": [ids]}} ({e})")))?;
    let mut ids = file.token_ids;
    if ids.is_empty() {
        return Err(bad("token_ids is empty".into()));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(bad(format!(
            "token id {id} is outside the text encoder's vocabulary of size {vocab_size}"
        )));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(Some(ids))
}

impl ClipTextModel {
    /// Loads from a VarBuilder over transformers' names, with or without the `text_model.`
    /// prefix (SD repositories' `text_encoder/model.safetensors` have it).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), &cfg.layer_dims()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .get((cfg.vocab_size, d), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, d), "weight")?,
            layers,
            final_layer_norm: LayerNorm::new(vb.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
            trained_tokens: None,
        })
    }

    /// Marks which token ids were trained (see [`TRAINED_TOKENS_FILE`]); `None`: all.
    pub fn with_trained_tokens(mut self, ids: Option<Vec<u32>>) -> Self {
        self.trained_tokens = ids;
        self
    }

    /// The trained token ids (sorted), when the model folder listed them.
    pub fn trained_tokens(&self) -> Option<&[u32]> {
        self.trained_tokens.as_deref()
    }

    /// Loads `<dir>/text_encoder/config.json` and `<dir>/text_encoder/model[.<variant>]
    /// .safetensors` of a diffusers model folder (see [`crate::pretrained`]), converting the
    /// weights to `dtype` on `device`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        use crate::pretrained::{config_path, open_weights, TEXT_ENCODER};
        let dir = dir.as_ref();
        let cfg = ClipTextConfig::from_file(config_path(dir, &TEXT_ENCODER)?)?;
        let weights = open_weights(dir, &TEXT_ENCODER, variant)?;
        let trained = read_trained_tokens(&dir.join(TEXT_ENCODER.subfolder), cfg.vocab_size)?;
        Ok(Self::new(weights.into_var_builder(dtype, device), &cfg)?.with_trained_tokens(trained))
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The token embeddings of `input_ids` (`[b, s]`, any integer dtype), `[b, s, d]`.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = self.read_ids(input_ids)?;
        let (b, s) = input_ids.dims2()?;
        let flat: Vec<u32> = ids.iter().flatten().map(|&i| i as u32).collect();
        let index = Tensor::from_vec(flat, b * s, self.token_embedding.device())?;
        self.token_embedding
            .index_select(&index, 0)?
            .reshape((b, s, self.cfg.hidden_size))
    }

    /// Replaces the embeddings at the placeholder positions by the soft prompt `soft` (`[k, d]`,
    /// typically a `Var`'s tensor): the `j`-th occurrence of `placeholder_id` in each row of
    /// `input_ids` gets `soft[j]`. Every row must hold exactly `k` placeholders. Differentiable
    /// in both `token_embeds` and `soft` (one `index_select` over `cat(tokens, soft)`).
    pub fn splice(
        &self,
        token_embeds: &Tensor,
        input_ids: &Tensor,
        placeholder_id: u32,
        soft: &Tensor,
    ) -> Result<Tensor> {
        let ids = self.read_ids(input_ids)?;
        let (b, s, d) = token_embeds.dims3()?;
        if (b, s) != input_ids.dims2()? {
            bail!(
                "splice: token embeddings {:?} do not match input_ids {:?}",
                token_embeds.dims(),
                input_ids.dims()
            )
        }
        let (k, soft_d) = soft.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "splice: the soft prompt must be [k, {d}], got {:?}",
                soft.dims()
            ))
        })?;
        if soft_d != d {
            bail!("splice: soft prompt width {soft_d} != embedding width {d}")
        }
        if soft.dtype() != token_embeds.dtype() {
            bail!(
                "splice: soft prompt dtype {:?} != token embeddings dtype {:?}",
                soft.dtype(),
                token_embeds.dtype()
            )
        }
        // Row-major index into cat([tokens (b*s rows), soft (k rows)]).
        let mut index = Vec::with_capacity(b * s);
        for (row, row_ids) in ids.iter().enumerate() {
            let mut j = 0;
            for (pos, &id) in row_ids.iter().enumerate() {
                if id == placeholder_id as i64 {
                    index.push((b * s + j.min(k)) as u32);
                    j += 1;
                } else {
                    index.push((row * s + pos) as u32);
                }
            }
            if j != k {
                bail!(
                    "splice: row {row} of input_ids holds placeholder id {placeholder_id} {j} \
                     times, but the soft prompt has {k} vectors (each row needs exactly {k})"
                )
            }
        }
        let table = Tensor::cat(&[&token_embeds.reshape((b * s, d))?, soft], 0)?;
        let index = Tensor::from_vec(index, b * s, token_embeds.device())?;
        table.index_select(&index, 0)?.reshape((b, s, d))
    }

    /// Runs the encoder on `inputs_embeds` (`[b, s, d]`, token embeddings before positions);
    /// `input_ids` (`[b, s]`) only pick each row's pooled position.
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        input_ids: &Tensor,
    ) -> Result<ClipTextOutput> {
        let ids = self.read_ids(input_ids)?;
        let (b, s, d) = inputs_embeds.dims3()?;
        if (b, s) != input_ids.dims2()? || d != self.cfg.hidden_size {
            bail!(
                "CLIP text encoder: inputs_embeds {:?} must be [b, s, {}] with input_ids [b, s] \
                 (got input_ids {:?})",
                inputs_embeds.dims(),
                self.cfg.hidden_size,
                input_ids.dims()
            )
        }
        let pooled_at = self.pooled_positions(&ids)?;

        let positions = self
            .position_embedding
            .narrow(0, 0, s)?
            .to_dtype(inputs_embeds.dtype())?;
        let mut x = inputs_embeds.broadcast_add(&positions)?;
        let mut penultimate = x.clone();
        for layer in &self.layers {
            penultimate = x.clone();
            x = layer.forward(&x, AttentionMask::Causal)?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;

        let flat_index: Vec<u32> = pooled_at
            .iter()
            .enumerate()
            .map(|(row, &pos)| (row * s + pos) as u32)
            .collect();
        let flat_index = Tensor::from_vec(flat_index, b, last_hidden_state.device())?;
        let pooled = last_hidden_state
            .reshape((b * s, d))?
            .index_select(&flat_index, 0)?;
        Ok(ClipTextOutput {
            last_hidden_state,
            penultimate_hidden_state: penultimate,
            pooled,
        })
    }

    /// Encodes token ids with no soft prompt.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_embeds(&self.embed_tokens(input_ids)?, input_ids)
    }

    /// The ids as host integers, checked: `[b, s]`, `s <= max_position_embeddings`, every id in
    /// `0..vocab_size`.
    fn read_ids(&self, input_ids: &Tensor) -> Result<Vec<Vec<i64>>> {
        let (_, s) = input_ids.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "CLIP text encoder: input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if !input_ids.dtype().is_int() {
            bail!(
                "CLIP text encoder: input_ids must be integers, got {:?}",
                input_ids.dtype()
            )
        }
        if s > self.cfg.max_position_embeddings {
            bail!(
                "CLIP text encoder: sequence length {s} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )
        }
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        for (row, r) in ids.iter().enumerate() {
            for (pos, &id) in r.iter().enumerate() {
                if id < 0 || id as usize >= self.cfg.vocab_size {
                    bail!(
                        "CLIP text encoder: token id {id} (row {row}, position {pos}) is outside \
                         the vocabulary of size {}",
                        self.cfg.vocab_size
                    )
                }
            }
        }
        Ok(ids)
    }

    /// Each row's pooled position, as transformers 5.24 picks it (see the module doc).
    fn pooled_positions(&self, ids: &[Vec<i64>]) -> Result<Vec<usize>> {
        let mut positions = Vec::with_capacity(ids.len());
        for (row, r) in ids.iter().enumerate() {
            let pos = match self.cfg.eos_token_id {
                // Legacy configs (before transformers PR #24773): the first highest id.
                Some(2) => {
                    let max = r.iter().copied().max().unwrap_or(0);
                    r.iter().position(|&id| id == max).unwrap_or(0)
                }
                Some(eos) => match r.iter().position(|&id| id == eos as i64) {
                    Some(pos) => pos,
                    None => bail!(
                        "CLIP text encoder: row {row} of input_ids has no end-of-text id {eos} \
                         to pool at (the tokenizer appends it; transformers would pool position 0)"
                    ),
                },
                None => bail!(
                    "CLIP text encoder: the config has no eos_token_id, so no position to pool"
                ),
            };
            positions.push(pos);
        }
        Ok(positions)
    }
}
