//! ShapesWorld: a procedural world of shapes with planted biases, the classifier under audit
//! trained on it, and the ground truth measured from both (docs/shapesworld.md).
//!
//! - [`spec`]: the TOML world spec and its validation;
//! - [`render`]: the deterministic anti-aliased renderer (images, exact masks, captions);
//! - [`splits`]: the biased train/validation splits and the balanced split;
//! - [`net`]: the classifier in training mode (train-mode batch norm, im2col convolutions);
//! - [`train`]: the one trainer every world model uses (seeded batches, AdamW, checkpoints);
//! - [`classifier`]: the classifier under audit (a tiny torchvision-named ResNet) and its
//!   per-group accuracy;
//! - [`truth`]: reliance by intervention and predictive features' object shares;
//! - [`heldout`]: the (shape, colour, background) combinations the generative models never see;
//! - [`checker`]: the attribute checker (ShapesWorld II), an independent multi-head classifier
//!   trained on the balanced distribution that judges generated and reconstructed images;
//! - [`autoencoder`]: diffusers' `AutoencoderKL` trained on world images (ShapesWorld II);
//! - [`clip`]: CLIP's text and vision towers trained contrastively on (image, caption) pairs
//!   (ShapesWorld II), and [`clip_eval`]: its zero-shot measurements;
//! - [`train_all`]: `world train`, every model of a world from one spec, resumable;
//! - [`diffusion`]: diffusers' `UNet2DConditionModel` trained on the autoencoder's latents,
//!   conditioned on the CLIP text tower (ShapesWorld II);
//! - [`cli`]: `diffexplainer world train | render | train-classifier | truth | train-checker |
//!   train-vae | train-clip | train-unet | check-unet`.

pub mod autoencoder;
pub mod checker;
pub mod classifier;
pub mod cli;
mod cli_models;
mod cli_unet;
pub mod clip;
pub mod clip_eval;
pub mod diffusion;
pub mod heldout;
pub mod net;
pub mod render;
pub mod spec;
pub mod splits;
pub mod train;
pub mod train_all;
pub mod truth;

pub use spec::WorldSpec;
pub use splits::{sample, Dataset, Sample, Split};
