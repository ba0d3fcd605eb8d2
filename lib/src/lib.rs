//! DiffExplainer: global explanations of image classifiers by optimizing a soft prompt through a
//! differentiable latent diffusion model (Pennisi et al., "Towards Cross-modal Global
//! Explanations with Diffusion Models").
//!
//! Layers, each depending only on those above it:
//! - [`ops`]: differentiable primitives (norms, softmax, attention, pools, resize) whose
//!   backward candle's fused kernels lack; linear/conv layers that compute only the input
//!   gradient for frozen weights ([`ops::frozen`]); memory-efficient attention.
//! - [`rng`], [`io`]: device-independent seeded noise; atomic file writes.
//! - [`weights`]: checkpoint loading (safetensors, PyTorch pickles) with precise errors.
//! - [`pretrained`]: the Hugging Face diffusers folder layout (`unet/`, `vae/`, ...).
//! - [`lora`]: LoRA fusion (kohya and diffusers/PEFT keys) into a checkpoint overlay.
//! - [`models`]: the networks, named like their checkpoints: CLIP text encoder, classifiers
//!   (ResNet, VGG, ViT), UNet, VAE.
//! - [`sampling`]: schedulers (DDIM, LCM, Euler ancestral) and the differentiable sampling loop.
//! - [`tokenizer`]: CLIP's BPE tokenizer (prompt text -> 77 token ids), with OpenAI's vocabulary
//!   compiled in.
//! - [`explain`]: DiffExplainer itself: objectives, the soft prompt, model bundles (diffusers
//!   folders, the local Hugging Face cache, presets, an embedded tiny default), the
//!   differentiable pipeline, the optimization loop, nearest-token explanations, run records.
//! - [`parity`]: data-driven parity cases against the reference libraries.
//! - [`testing`]: finite-difference gradient checks, random weights for tests and benchmarks.
//! - [`world`]: ShapesWorld, a procedural world with planted biases, the classifier under
//!   audit trained on it, and the ground truth measured from both.
//! - [`display`]: rich notebook output (images, tables, live progress) and interrupt polling,
//!   as a plain-text marker protocol any Jupyter kernel can read.

pub mod display;
pub mod explain;
pub mod io;
pub mod lora;
pub mod models;
pub mod ops;
pub mod parity;
pub mod plot;
pub mod pretrained;
pub mod rng;
pub mod sampling;
pub mod spurious;
pub mod testing;
pub mod tokenizer;
pub mod weights;
pub mod world;
