//! DiffExplainer itself: what to maximize ([`objective`]), the soft prompt, the models
//! ([`bundle`]) and the differentiable pipeline through them ([`pipeline`]), the optimization
//! loop, the textual explanation ([`tokens`]) and run records ([`record`]).

pub mod activation;
pub mod bundle;
pub mod live;
pub mod objective;
pub mod optimize;
pub mod pipeline;
pub mod recipe;
pub mod record;
pub mod soft_prompt;
pub mod sweep;
pub mod tokens;

pub use activation::{ActivationScore, ActivationScores};
pub use bundle::{ClassifierSpec, DiffusionSource, ModelBundle, ModelSpec};
pub use live::{activation_chart, probability_chart, LiveView};
pub use objective::Objective;
pub use optimize::{
    optimize, CancelToken, IterationMetrics, OptimizeConfig, Optimized, Pipeline, StopReason,
};
pub use pipeline::{DiffusionPipeline, GradientPath, PipelineOptions, StepNoise};
pub use recipe::{ClassObjective, Recipe, RunChoices, RunSettings};
pub use record::{RunConfig, RunRecord, RunSummary, RunWriter};
pub use soft_prompt::{SoftPrompt, SoftPromptInit};
pub use tokens::{nearest_tokens, nearest_tokens_among, TextualExplanation};
