//! The networks. Each file spells its checkpoint's parameter names through `VarBuilder`
//! prefixes, so reference weights load with no renaming table.

pub mod classifiers;
pub mod clip_encoder;
pub mod clip_text;
pub mod clip_vision;
pub mod clipseg;
pub mod unet;
pub mod vae;
