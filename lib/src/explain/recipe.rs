//! Run settings where the authors' code (DEXTER, the same group's public descendant of
//! DiffExplainer) differs from ours, and `--recipe paper`, which takes all of theirs at once.
//!
//! | setting | ours (default) | theirs (`paper`) |
//! |---|---|---|
//! | gradient path | `full`: through every UNet step | `truncated`: UNet input detached at each step |
//! | step noise | `fixed`: drawn once | `fresh`: LCM re-noise redrawn every iteration |
//! | class objective | `logit` | `cross_entropy` (maximize the log-probability) |
//! | classifier resize | antialiased | not antialiased |
//! | early stop | off | after 3 consecutive iterations with every image classified as the target |
//! | iterations | 30 (CLI) | cap 1000 |
//!
//! A choice made explicitly wins over the recipe. A recipe setting that would have no effect in
//! a combination (e.g. the resize when the images already have the classifier's size, or early
//! stop with a feature objective) is left out with a note; the same setting given explicitly is
//! refused (every option acts or is refused). The models are not part of the recipe: their base
//! is `--preset sd14-lcm`. See `docs/recipe.md`.

use serde::{Deserialize, Serialize};

use super::pipeline::{GradientPath, OptionEffects, StepNoise};

/// A named bundle of settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// The authors' code's choices.
    Paper,
}

impl std::str::FromStr for Recipe {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "paper" => Ok(Self::Paper),
            other => anyhow::bail!("unknown recipe `{other}` (known: paper)"),
        }
    }
}

impl std::fmt::Display for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Paper => "paper",
        })
    }
}

/// What a class objective maximizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassObjective {
    /// The class's logit ([`super::Objective::logit`]).
    #[default]
    Logit,
    /// The class's log-probability, i.e. minus the cross-entropy to the class
    /// ([`super::Objective::log_probability`]).
    CrossEntropy,
}

impl std::str::FromStr for ClassObjective {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "logit" => Ok(Self::Logit),
            "cross-entropy" | "cross_entropy" => Ok(Self::CrossEntropy),
            other => anyhow::bail!("unknown class objective `{other}` (logit or cross-entropy)"),
        }
    }
}

/// The iteration count without a recipe or an explicit choice (the CLI's default).
pub const DEFAULT_ITERATIONS: usize = 30;
/// The paper recipe's iteration cap and early-stop streak.
pub const PAPER_ITERATIONS: usize = 1000;
pub const PAPER_EARLY_STOP: usize = 3;

/// The user's choices: `None` takes the recipe's setting, or else the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunChoices {
    pub recipe: Option<Recipe>,
    pub iterations: Option<usize>,
    pub early_stop: Option<usize>,
    pub class_objective: Option<ClassObjective>,
    pub gradient_path: Option<GradientPath>,
    pub step_noise: Option<StepNoise>,
    pub resize_antialias: Option<bool>,
}

/// The settings a run uses.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub iterations: usize,
    pub early_stop: Option<usize>,
    pub class_objective: ClassObjective,
    pub gradient_path: GradientPath,
    pub step_noise: StepNoise,
    pub resize_antialias: bool,
    /// Recipe settings left out because they would have no effect here, each with the reason.
    pub notes: Vec<String>,
}

impl RunChoices {
    /// Resolves the choices for a run that has (`has_class`) or has not a target class, with
    /// a bundle whose option effects are `effects`. Explicit class-only choices without a class
    /// are refused; recipe ones are left out with a note.
    pub fn resolve(&self, has_class: bool, effects: OptionEffects) -> anyhow::Result<RunSettings> {
        let paper = self.recipe == Some(Recipe::Paper);
        let mut notes = Vec::new();
        if !has_class {
            if self.early_stop.is_some() {
                anyhow::bail!(
                    "--early-stop counts iterations in which every image is classified as the \
                     target class; it has no meaning without --class"
                )
            }
            if self.class_objective.is_some() {
                anyhow::bail!("--class-objective applies to --class, not to --neuron/--features")
            }
        }
        // An explicit choice that cannot change anything is refused, whichever value it names.
        let explicit_without_effect = [
            (
                self.gradient_path.is_some() && !effects.gradient_path,
                "--gradient-path has no effect with one sampling step (the UNet's only input is \
                 the initial noise, a constant anyway)",
            ),
            (
                self.step_noise.is_some() && !effects.step_noise,
                "--step-noise has no effect here: the schedule adds no noise between steps (DDIM, \
                 or a single step)",
            ),
            (
                self.resize_antialias.is_some() && !effects.resize_antialias,
                "--resize-antialias has no effect here: the images are not shrunk for the \
                 classifier (antialiasing acts only when downsampling)",
            ),
        ];
        if let Some((_, why)) = explicit_without_effect.iter().find(|(bad, _)| *bad) {
            anyhow::bail!("{why}")
        }
        let mut pick = |name: &str, explicit: bool, acts: bool, why: &str| -> bool {
            // Whether the recipe's (non-default) setting is taken.
            if explicit || !paper {
                return false;
            }
            if !acts {
                notes.push(format!("recipe paper: {name} left out ({why})"));
            }
            acts
        };
        let early = pick(
            "early stop",
            self.early_stop.is_some(),
            has_class,
            "no target class",
        );
        let ce = pick(
            "cross-entropy objective",
            self.class_objective.is_some(),
            has_class,
            "no target class",
        );
        let truncated = pick(
            "truncated gradient",
            self.gradient_path.is_some(),
            effects.gradient_path,
            "one sampling step",
        );
        let fresh = pick(
            "fresh step noise",
            self.step_noise.is_some(),
            effects.step_noise,
            "the schedule adds no noise between steps",
        );
        let no_antialias = pick(
            "resize without antialias",
            self.resize_antialias.is_some(),
            effects.resize_antialias,
            "the images are not shrunk for the classifier",
        );
        Ok(RunSettings {
            iterations: self.iterations.unwrap_or(if paper {
                PAPER_ITERATIONS
            } else {
                DEFAULT_ITERATIONS
            }),
            early_stop: self.early_stop.or(early.then_some(PAPER_EARLY_STOP)),
            class_objective: self.class_objective.unwrap_or(if ce {
                ClassObjective::CrossEntropy
            } else {
                ClassObjective::Logit
            }),
            gradient_path: self.gradient_path.unwrap_or(if truncated {
                GradientPath::Truncated
            } else {
                GradientPath::Full
            }),
            step_noise: self.step_noise.unwrap_or(if fresh {
                StepNoise::Fresh
            } else {
                StepNoise::Fixed
            }),
            resize_antialias: self.resize_antialias.unwrap_or(!no_antialias),
            notes,
        })
    }
}
