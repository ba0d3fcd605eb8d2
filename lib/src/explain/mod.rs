//! DiffExplainer itself: what to maximize ([`objective`]), the soft prompt, the optimization
//! loop and its records.

pub mod objective;
pub mod optimize;
pub mod soft_prompt;

pub use objective::Objective;
pub use optimize::{
    optimize, CancelToken, IterationMetrics, OptimizeConfig, Optimized, Pipeline, StopReason,
};
pub use soft_prompt::{SoftPrompt, SoftPromptInit};
