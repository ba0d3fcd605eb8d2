//! One runner per module kind: build the module from the case's config and weights, run it on
//! the case's inputs, return the named outputs. Glue only; the modules live in `ops` and `models`.

use std::collections::HashMap;

use candle_core::{Module, Tensor};
use serde::Deserialize;

use super::CaseInputs;
use crate::models::classifiers::{Classifier, ClassifierConfig, Preprocess};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::clip_vision::{
    ClipVisionConfig, ClipVisionModelWithProjection, ClipVisionOptions,
};
use crate::models::clipseg::{ClipSegConfig, ClipSegForImageSegmentation};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::ops;
use crate::sampling::{self, LcmScheduler, SamplerOptions, SchedulerConfig};

pub type Outputs = HashMap<String, Tensor>;
pub type Runner = fn(&CaseInputs) -> anyhow::Result<Outputs>;

/// Every kind a case may name.
pub const KINDS: &[(&str, Runner)] = &[
    ("op.layer_norm", layer_norm),
    ("op.group_norm", group_norm),
    ("op.softmax", |c| unary(c, ops::softmax_last_dim)),
    ("op.log_softmax", |c| unary(c, ops::log_softmax_last_dim)),
    ("op.attention", attention),
    ("op.gelu_erf", |c| unary(c, ops::gelu_erf)),
    ("op.gelu_tanh", |c| unary(c, ops::gelu_tanh)),
    ("op.quick_gelu", |c| unary(c, ops::quick_gelu)),
    ("op.silu", |c| unary(c, ops::silu)),
    ("op.max_pool2d", |c| pool(c, ops::max_pool2d)),
    ("op.avg_pool2d", |c| pool(c, ops::avg_pool2d)),
    ("op.adaptive_avg_pool2d", adaptive_avg_pool2d),
    ("op.upsample_nearest2x", |c| {
        unary(c, ops::upsample_nearest2x)
    }),
    ("op.resize_bilinear", resize_bilinear),
    ("op.resize_bicubic", resize_bicubic),
    ("clip_text", clip_text),
    ("clip_vision", clip_vision),
    ("clipseg", clipseg),
    ("resnet", |c| classifier(c, ClassifierConfig::ResNet)),
    ("vgg", |c| classifier(c, ClassifierConfig::Vgg)),
    ("vit", |c| classifier(c, ClassifierConfig::Vit)),
    ("unet2d_condition", unet2d_condition),
    ("vae_decoder", vae_decoder),
    ("vae_encoder", vae_encoder),
    ("lcm_sample_decode", lcm_sample_decode),
];

pub fn runner(kind: &str) -> Option<Runner> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, r)| *r)
}

fn single(y: Tensor) -> anyhow::Result<Outputs> {
    Ok(HashMap::from([("y".to_string(), y)]))
}

fn unary(
    case: &CaseInputs,
    op: fn(&Tensor) -> candle_core::Result<Tensor>,
) -> anyhow::Result<Outputs> {
    single(op(case.input("x")?)?)
}

#[derive(Deserialize)]
struct NormConfig {
    eps: f64,
    #[serde(default)]
    num_groups: usize,
}

fn layer_norm(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg: NormConfig = case.config()?;
    let x = case.input("x")?;
    let dim = x.dim(candle_core::D::Minus1)?;
    single(ops::LayerNorm::new(case.weights()?, dim, cfg.eps)?.forward(x)?)
}

fn group_norm(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg: NormConfig = case.config()?;
    let x = case.input("x")?;
    single(ops::GroupNorm::new(case.weights()?, cfg.num_groups, x.dim(1)?, cfg.eps)?.forward(x)?)
}

fn attention(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let causal = case.option::<bool>("causal")?.unwrap_or(false);
    let scale = case.option::<f64>("scale")?;
    let mask = case.inputs.get("mask");
    let mask = match (causal, mask) {
        (false, None) => ops::AttentionMask::None,
        (true, None) => ops::AttentionMask::Causal,
        (false, Some(m)) => ops::AttentionMask::Additive(m),
        (true, Some(m)) => ops::AttentionMask::CausalAndAdditive(m),
    };
    single(ops::scaled_dot_product_attention(
        case.input("q")?,
        case.input("k")?,
        case.input("v")?,
        mask,
        scale,
    )?)
}

fn pool(
    case: &CaseInputs,
    op: fn(&Tensor, usize, usize, usize) -> candle_core::Result<Tensor>,
) -> anyhow::Result<Outputs> {
    let kernel = required(case, "kernel")?;
    let stride = case.option::<usize>("stride")?.unwrap_or(kernel);
    let padding = case.option::<usize>("padding")?.unwrap_or(0);
    single(op(case.input("x")?, kernel, stride, padding)?)
}

fn adaptive_avg_pool2d(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let [h, w]: [usize; 2] = required(case, "output_size")?;
    single(ops::adaptive_avg_pool2d(case.input("x")?, (h, w))?)
}

fn resize_bilinear(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let [h, w]: [usize; 2] = required(case, "size")?;
    let antialias = case.option::<bool>("antialias")?.unwrap_or(false);
    single(ops::resize_bilinear(case.input("x")?, (h, w), antialias)?)
}

/// Several output sizes of one input, flattened and concatenated (one case covers up- and
/// downscaling).
fn resize_bicubic(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let sizes: Vec<[usize; 2]> = required(case, "sizes")?;
    let x = case.input("x")?;
    let parts = sizes
        .iter()
        .map(|&[h, w]| ops::resize_bicubic(x, (h, w))?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    single(Tensor::cat(&parts, 0)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreprocessOption {
    resize: Option<usize>,
    #[serde(default)]
    antialias: bool,
}

/// The classifier kinds: input `pixel_values` (already normalized), or `image` in [0, 1] with
/// `options.preprocess` (resize, then ImageNet normalization). Outputs: `logits`, `features`
/// and every hidden tap by its name.
fn classifier<C: serde::de::DeserializeOwned>(
    case: &CaseInputs,
    wrap: fn(C) -> ClassifierConfig,
) -> anyhow::Result<Outputs> {
    let model = Classifier::new(case.weights()?, &wrap(case.config()?))?;
    let x = match (case.inputs.get("pixel_values"), case.inputs.get("image")) {
        (Some(x), _) => x.clone(),
        (None, Some(image)) => {
            let p: PreprocessOption = required(case, "preprocess")?;
            let preprocess = Preprocess {
                size: p.resize,
                antialias: p.antialias,
                ..Preprocess::imagenet(0)
            };
            preprocess.forward(image)?
        }
        (None, None) => anyhow::bail!(
            "{}: inputs.safetensors needs `pixel_values` or `image`",
            case.dir.display()
        ),
    };
    let out = model.forward(&x)?;
    let mut outputs = out.hidden;
    outputs.insert("logits".to_string(), out.logits);
    outputs.insert("features".to_string(), out.features);
    Ok(outputs.into_iter().collect())
}

fn unet2d_condition(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg: UNet2DConditionConfig = case.config()?;
    let unet = UNet2DConditionModel::new(case.weights()?, &cfg)?;
    let y = unet.forward_with_timesteps(
        case.input("sample")?,
        case.input("timestep")?,
        case.input("encoder_hidden_states")?,
    )?;
    Ok(HashMap::from([("sample".to_string(), y)]))
}

fn vae_decoder(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg: AutoencoderKLConfig = case.config()?;
    let vae = AutoencoderKL::decoder_only(case.weights()?, &cfg)?;
    let y = vae.decode(case.input("latents")?)?;
    Ok(HashMap::from([("sample".to_string(), y)]))
}

fn vae_encoder(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg: AutoencoderKLConfig = case.config()?;
    let vae = AutoencoderKL::new(case.weights()?, &cfg)?;
    let y = vae.encode(case.input("image")?)?;
    Ok(HashMap::from([("latent_mean".to_string(), y)]))
}

/// `config.json` of `lcm_sample_decode`: the three diffusers configs side by side.
#[derive(Deserialize)]
struct LcmSampleDecodeConfig {
    unet: UNet2DConditionConfig,
    vae: AutoencoderKLConfig,
    /// Read as `LCMScheduler.from_config` reads it, whatever its `_class_name`.
    scheduler: SchedulerConfig,
}

/// A whole DiffExplainer forward: `options.steps` LCM steps of the UNet from `initial_noise`
/// with the fixed `step_noises` ([steps, b, c, h, w]), then the VAE decoder on
/// `latents / scaling_factor`. Outputs `latents` (the last step's denoised latents) and `sample`
/// (the raw decode, before `/ 2 + 0.5` and the clamp). With `options.gradient_checkpointing`
/// the UNet recomputes its blocks in backward (same numbers, less memory).
fn lcm_sample_decode(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg: LcmSampleDecodeConfig = case.config()?;
    let vb = case.weights()?;
    let mut unet = UNet2DConditionModel::new(vb.pp("unet"), &cfg.unet)?;
    unet.set_gradient_checkpointing(case.option("gradient_checkpointing")?.unwrap_or(false));
    let vae = AutoencoderKL::decoder_only(vb.pp("vae"), &cfg.vae)?;
    let mut scheduler = LcmScheduler::new(&cfg.scheduler)?;
    let steps: usize = required(case, "steps")?;
    let noises = case.input("step_noises")?;
    let step_noises = (0..noises.dim(0)?)
        .map(|i| noises.get(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let out = sampling::sample(
        &mut scheduler,
        |x, t, c| unet.forward(x, t, c),
        case.input("initial_noise")?,
        case.input("encoder_hidden_states")?,
        &SamplerOptions::new(steps).with_step_noises(step_noises),
    )?;
    let sample = vae.decode(&vae.unscale_latents(&out.latents)?)?;
    Ok(HashMap::from([
        ("latents".to_string(), out.latents),
        ("sample".to_string(), sample),
    ]))
}

fn required<T: serde::de::DeserializeOwned>(case: &CaseInputs, name: &str) -> anyhow::Result<T> {
    case.option(name)?
        .ok_or_else(|| anyhow::anyhow!("{}: case.json needs option `{name}`", case.dir.display()))
}

/// `inputs_embeds` is the differentiated input (the soft prompt lives there); `input_ids` only
/// pick the pooled position.
fn clip_text(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg = ClipTextConfig::from_value(case.config.clone())?;
    let model = ClipTextModel::new(case.weights()?, &cfg)?;
    let out = model.forward_embeds(case.input("inputs_embeds")?, case.input("input_ids")?)?;
    Ok(HashMap::from([
        ("last_hidden_state".to_string(), out.last_hidden_state),
        (
            "penultimate_hidden_state".to_string(),
            out.penultimate_hidden_state,
        ),
        ("pooler_output".to_string(), out.pooled),
    ]))
}

/// `CLIPVisionModelWithProjection` on `pixel_values`: `last_hidden_state`, `pooler_output`,
/// `image_embeds`, and `hidden_states.<i>` for each index in `options.hidden_states`.
fn clip_vision(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg = ClipVisionConfig::from_value(case.config.clone())?;
    let model = ClipVisionModelWithProjection::new(case.weights()?, &cfg)?;
    let options = ClipVisionOptions {
        hidden_states: case.option("hidden_states")?.unwrap_or_default(),
        interpolate_pos_encoding: case.option("interpolate_pos_encoding")?.unwrap_or(false),
    };
    let out = model
        .vision_model
        .forward_with(case.input("pixel_values")?, &options)?;
    let mut outputs = HashMap::from([
        (
            "image_embeds".to_string(),
            model.image_embeds(&out.pooler_output)?,
        ),
        ("last_hidden_state".to_string(), out.last_hidden_state),
        ("pooler_output".to_string(), out.pooler_output),
    ]);
    for (i, h) in out.hidden_states {
        outputs.insert(format!("hidden_states.{i}"), h);
    }
    Ok(outputs)
}

/// `CLIPSegForImageSegmentation` on `pixel_values` (normalized) and `input_ids` (the text query):
/// `logits` and `conditional_embeddings`.
fn clipseg(case: &CaseInputs) -> anyhow::Result<Outputs> {
    let cfg = ClipSegConfig::from_value(case.config.clone())?;
    let model = ClipSegForImageSegmentation::new(case.weights()?, &cfg)?;
    let cond = model.conditional_embeddings(case.input("input_ids")?)?;
    let logits = model.forward(case.input("pixel_values")?, &cond)?;
    Ok(HashMap::from([
        ("logits".to_string(), logits),
        ("conditional_embeddings".to_string(), cond),
    ]))
}
