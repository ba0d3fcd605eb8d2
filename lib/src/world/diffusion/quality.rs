//! Sampling the trained UNet and judging the images (issue 13 item 2): captions of held-out
//! (shape, colour, background) combinations, one set per caption template, sampled with the
//! shipped DDIM schedule from seeded noise, decoded by the autoencoder and read by the attribute
//! checker; per template, the share of images showing each attribute the caption names.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::super::checker::Checker;
use super::super::classifier::Accuracy;
use super::super::heldout::{self, Combination};
use super::super::render::{self, Scene};
use super::super::WorldSpec;
use super::data::TextConditioning;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::rng::SeededRng;
use crate::sampling::{sample, DdimScheduler, SamplerOptions, SchedulerConfig};

/// One prompt: a caption template filled with a held-out combination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prompt {
    pub template: String,
    pub caption: String,
    pub shape: String,
    pub color: String,
    pub texture: String,
    pub background: String,
}

/// The checker attributes a template names (`{background_noun}` names the background).
pub fn named_attributes(template: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (attribute, keys) in [
        ("shape", &["{shape}"][..]),
        ("color", &["{color}"][..]),
        ("texture", &["{texture}"][..]),
        ("background", &["{background}", "{background_noun}"][..]),
    ] {
        if keys.iter().any(|k| template.contains(k)) {
            out.push(attribute);
        }
    }
    out
}

/// Per template, the captions of the held-out combinations (distinct captions only: "a {shape}"
/// gives one per shape). Textures, which are not part of a combination, cycle through the
/// spec's values.
pub fn heldout_prompts(spec: &WorldSpec) -> anyhow::Result<Vec<Vec<Prompt>>> {
    let combos = heldout::heldout_combinations(spec)?;
    let textures = spec.values("texture").expect("a known attribute");
    Ok(spec
        .captions
        .templates
        .iter()
        .map(|template| {
            let mut prompts: Vec<Prompt> = Vec::new();
            for (i, c) in combos.iter().enumerate() {
                let texture = textures[i % textures.len()].clone();
                let caption = render::caption(template, &scene_of(c, &texture));
                if prompts.iter().all(|p| p.caption != caption) {
                    prompts.push(Prompt {
                        template: template.clone(),
                        caption,
                        shape: c.shape.clone(),
                        color: c.color.clone(),
                        texture,
                        background: c.background.clone(),
                    });
                }
            }
            prompts
        })
        .collect())
}

fn scene_of(c: &Combination, texture: &str) -> Scene {
    Scene {
        shape: c.shape.clone(),
        color: c.color.clone(),
        texture: texture.to_string(),
        background: c.background.clone(),
        size: "medium".into(),
        center: [0.0, 0.0],
        radius: 0.0,
        rotation: 0.0,
        background_seed: 0,
    }
}

/// Images `[n, 3, s, s]` in `[0, 1]` for text states `cond` `[n, tokens, width]`: `steps` DDIM
/// steps of `scheduler` from standard normal latents drawn from `seed`, decoded by `vae`
/// (as the explainer's pipeline does, without guidance).
pub fn generate(
    unet: &UNet2DConditionModel,
    vae: &AutoencoderKL,
    scheduler: &SchedulerConfig,
    cond: &Tensor,
    latent_size: usize,
    steps: usize,
    seed: u64,
) -> anyhow::Result<Tensor> {
    let n = cond.dim(0)?;
    let c = unet.config.in_channels;
    let noise = SeededRng::new(seed).normal(
        (n, c, latent_size, latent_size),
        cond.dtype(),
        &Device::Cpu,
    )?;
    generate_from(unet, vae, scheduler, cond, &noise, steps)
}

/// As [`generate`], from the initial latents `noise` `[n, c, h, w]`.
pub fn generate_from(
    unet: &UNet2DConditionModel,
    vae: &AutoencoderKL,
    scheduler: &SchedulerConfig,
    cond: &Tensor,
    noise: &Tensor,
    steps: usize,
) -> anyhow::Result<Tensor> {
    let mut ddim = DdimScheduler::new(scheduler)?;
    let latents = sample(
        &mut ddim,
        |x, t, c| unet.forward(x, t, c),
        noise,
        cond,
        &SamplerOptions::new(steps),
    )?
    .latents;
    Ok(vae.decode_to_image(&latents)?.detach())
}

/// One template's scores: per attribute it names, the share of images the checker reads as
/// the caption says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateQuality {
    pub template: String,
    /// The held-out captions, in sampling (and grid) order.
    pub captions: Vec<String>,
    pub images: usize,
    pub scores: Vec<(String, Accuracy)>,
}

/// The quality at one step count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quality {
    /// Training steps done when measured.
    pub step: usize,
    /// Sampling steps.
    pub sampling_steps: usize,
    pub samples_per_prompt: usize,
    pub templates: Vec<TemplateQuality>,
    /// Per attribute, over every template that names it.
    pub overall: Vec<(String, Accuracy)>,
}

/// The targets: shape, background and colour shares on held-out combinations.
pub const TARGETS: &[(&str, f64)] = &[("shape", 0.90), ("background", 0.90), ("color", 0.85)];

impl Quality {
    pub fn score(&self, attribute: &str) -> Option<f64> {
        self.overall
            .iter()
            .find(|(a, _)| a == attribute)
            .map(|(_, acc)| acc.value())
    }

    /// Whether every target is met.
    pub fn meets_targets(&self) -> bool {
        TARGETS
            .iter()
            .all(|(a, t)| self.score(a).is_some_and(|v| v >= *t))
    }

    pub fn line(&self) -> String {
        let parts: Vec<String> = self
            .overall
            .iter()
            .map(|(a, acc)| format!("{a} {:.1}%", 100.0 * acc.value()))
            .collect();
        format!(
            "step {:5}  {} sampling steps, {} samples per held-out caption: {}",
            self.step,
            self.sampling_steps,
            self.samples_per_prompt,
            parts.join(", ")
        )
    }
}

/// Everything a measurement needs.
pub struct Judge<'a> {
    pub spec: &'a WorldSpec,
    pub vae: &'a AutoencoderKL,
    pub text: &'a TextConditioning,
    pub checker: &'a Checker,
    pub scheduler: SchedulerConfig,
    pub latent_size: usize,
}

impl Judge<'_> {
    /// Samples `per_prompt` images of every held-out prompt with `steps` steps (the noise of
    /// prompt `p`'s images is seeded by `seed` and `p`, so every step count and every
    /// checkpoint sees the same noise) and scores them; also returns each template's images
    /// `[prompts · per_prompt, 3, s, s]`, prompt-major.
    pub fn measure(
        &self,
        unet: &UNet2DConditionModel,
        steps: usize,
        per_prompt: usize,
        seed: u64,
        step: usize,
    ) -> anyhow::Result<(Quality, Vec<Tensor>)> {
        let templates = heldout_prompts(self.spec)?;
        let heads = &self.checker.heads;
        let mut overall: Vec<(String, Accuracy)> = Vec::new();
        let mut out = Vec::new();
        let mut grids = Vec::new();
        let mut prompt_no = 0u64;
        for prompts in &templates {
            let captions: Vec<String> = prompts.iter().map(|p| p.caption.clone()).collect();
            let states = self.text.encode(&captions)?;
            // Each prompt's noise from its own seed; sampled in batches of up to 64 images.
            let c = unet.config.in_channels;
            let s = self.latent_size;
            let mut noises = Vec::new();
            let mut conds = Vec::new();
            for p in 0..prompts.len() {
                noises.push(
                    SeededRng::new(seed.wrapping_add(prompt_no.wrapping_mul(0x9E37_79B9))).normal(
                        (per_prompt, c, s, s),
                        candle_core::DType::F32,
                        &Device::Cpu,
                    )?,
                );
                conds.push(
                    states
                        .narrow(0, p, 1)?
                        .broadcast_as((per_prompt, states.dim(1)?, states.dim(2)?))?
                        .contiguous()?,
                );
                prompt_no += 1;
            }
            let (noise, cond) = (Tensor::cat(&noises, 0)?, Tensor::cat(&conds, 0)?);
            let total = noise.dim(0)?;
            let mut images = Vec::new();
            for start in (0..total).step_by(64) {
                let len = 64.min(total - start);
                images.push(generate_from(
                    unet,
                    self.vae,
                    &self.scheduler,
                    &cond.narrow(0, start, len)?,
                    &noise.narrow(0, start, len)?,
                    steps,
                )?);
            }
            let images = Tensor::cat(&images, 0)?;
            let read = self.checker.read(&images)?;
            let template = &prompts[0].template;
            let mut scores = Vec::new();
            for attribute in named_attributes(template) {
                let Some(k) = heads.iter().position(|h| h.attribute == attribute) else {
                    continue;
                };
                let mut acc = Accuracy {
                    correct: 0,
                    total: 0,
                };
                for (p, prompt) in prompts.iter().enumerate() {
                    let want = match attribute {
                        "shape" => &prompt.shape,
                        "color" => &prompt.color,
                        "texture" => &prompt.texture,
                        _ => &prompt.background,
                    };
                    let want = heads[k].values.iter().position(|v| v == want);
                    for r in &read[p * per_prompt..(p + 1) * per_prompt] {
                        acc.total += 1;
                        acc.correct += (Some(r[k]) == want) as usize;
                    }
                }
                match overall.iter_mut().find(|(a, _)| a == attribute) {
                    Some((_, o)) => {
                        o.correct += acc.correct;
                        o.total += acc.total;
                    }
                    None => overall.push((attribute.to_string(), acc)),
                }
                scores.push((attribute.to_string(), acc));
            }
            out.push(TemplateQuality {
                template: template.clone(),
                captions: prompts.iter().map(|p| p.caption.clone()).collect(),
                images: images.dim(0)?,
                scores,
            });
            grids.push(images);
        }
        Ok((
            Quality {
                step,
                sampling_steps: steps,
                samples_per_prompt: per_prompt,
                templates: out,
                overall,
            },
            grids,
        ))
    }
}

/// Writes `images` `[prompts · per_prompt, 3, s, s]` (prompt-major) as one PNG grid: each
/// prompt's images side by side, as many prompts per row as fit in 8 columns, the last row
/// padded with white.
pub fn save_grid(path: &Path, images: &Tensor, per_prompt: usize) -> anyhow::Result<()> {
    let (n, c, h, w) = images.dims4()?;
    if per_prompt == 0 || n == 0 || n % per_prompt != 0 {
        anyhow::bail!("save_grid: {n} images for {per_prompt} per prompt")
    }
    let cols = per_prompt * (8 / per_prompt).max(1);
    let rows = n.div_ceil(cols);
    let white = Tensor::ones((c, h, w), images.dtype(), images.device())?;
    let row_images = (0..rows)
        .map(|r| {
            let row: Vec<Tensor> = (0..cols)
                .map(|k| match r * cols + k {
                    i if i < n => images.get(i),
                    _ => Ok(white.clone()),
                })
                .collect::<candle_core::Result<_>>()?;
            Tensor::cat(&row, 2)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let grid = Tensor::cat(&row_images, 1)?.unsqueeze(0)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::explain::record::save_png(path, &grid)
}

/// Writes a template's grid (`<slug>.png`) and its captions in grid order (`<slug>.txt`) to
/// `dir`.
pub fn save_template_grid(
    dir: &Path,
    template: &str,
    prompts: &[String],
    images: &Tensor,
    per_prompt: usize,
) -> anyhow::Result<()> {
    let slug = template_slug(template);
    save_grid(&dir.join(format!("{slug}.png")), images, per_prompt)?;
    let per_row = (8 / per_prompt).max(1);
    let mut text =
        format!("{template}: {per_prompt} image(s) per caption, {per_row} caption(s) per row\n");
    for p in prompts {
        text.push_str(p);
        text.push('\n');
    }
    crate::io::write_bytes_atomically(&dir.join(format!("{slug}.txt")), text.as_bytes())
}

/// A file name for a template (`a_color_shape_background`).
pub fn template_slug(template: &str) -> String {
    let s: String = template
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let parts: Vec<&str> = s.split('_').filter(|p| !p.is_empty()).collect();
    parts.join("_")
}
