//! Objectives: what the generated images should make the classifier do, as values that compose
//! like Lucent's (`channel("mixed4a", 97) - 0.5 * diversity("mixed4a")`):
//!
//! ```
//! use diffexplainer::explain::Objective;
//! // Maximize "dog sled" (537) while staying away from "husky" (248), with diverse samples.
//! let objective = Objective::logit(537) - 0.5 * Objective::logit(248) + 0.1 * Objective::diversity("layer4");
//! assert_eq!(objective.to_string(), "logit[537] - 0.5·logit[248] + 0.1·diversity(layer4)");
//! ```
//!
//! Every objective is a scalar to **maximize**, averaged over the batch of generated images; the
//! optimizer minimizes its negation. Each term's value is also reported on its own (`terms`), so
//! a run's metrics show what every part of a composed objective did.

use std::fmt;

use candle_core::{Result, Tensor, D};

use crate::models::classifiers::ClassifierOutput;

/// One objective term. Compose terms with `+`, `-`, unary `-` and `f64 *`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Term {
    /// The class's logit.
    Logit(usize),
    /// The class's log-probability, `-cross_entropy(logits, class)`.
    LogProbability(usize),
    /// The mean of the pooled penultimate features at these indices (one hidden neuron, or a
    /// set such as a class's top-5 features, as Salient ImageNet defines them).
    Features(Vec<usize>),
    /// The spatial mean of one channel of a hidden feature map (`layer3`, `conv_features`, ...).
    Channel { tap: String, channel: usize },
    /// Minus the mean pairwise cosine similarity of the batch's Gram matrices at a tap (Lucent's
    /// diversity): rewards images that differ in style at that layer. Zero for a batch of one.
    Diversity { tap: String },
}

/// A weighted sum of terms, to maximize. Serializes as its terms (run records keep it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Objective {
    pub terms: Vec<(f64, Term)>,
}

impl Objective {
    fn single(term: Term) -> Self {
        Self {
            terms: vec![(1.0, term)],
        }
    }
    pub fn logit(class_id: usize) -> Self {
        Self::single(Term::Logit(class_id))
    }
    /// Maximizing the log-probability is minimizing the cross-entropy to `class_id`.
    pub fn log_probability(class_id: usize) -> Self {
        Self::single(Term::LogProbability(class_id))
    }
    pub fn neuron(index: usize) -> Self {
        Self::single(Term::Features(vec![index]))
    }
    pub fn features(indices: impl Into<Vec<usize>>) -> Self {
        Self::single(Term::Features(indices.into()))
    }
    /// The authors' class-and-features objective: the class term (its log-probability, or its
    /// logit) plus the **sum** of the given pooled features (e.g. the class's top-5 features
    /// as Salient ImageNet ranks them), i.e. `len(features)·features[...]`, the mean scaled.
    pub fn class_with_features(
        class_id: usize,
        log_probability: bool,
        features: impl Into<Vec<usize>>,
    ) -> Self {
        let features = features.into();
        let class = if log_probability {
            Self::log_probability(class_id)
        } else {
            Self::logit(class_id)
        };
        let k = features.len() as f64;
        class + k * Self::features(features)
    }
    pub fn channel(tap: impl Into<String>, channel: usize) -> Self {
        Self::single(Term::Channel {
            tap: tap.into(),
            channel,
        })
    }
    pub fn diversity(tap: impl Into<String>) -> Self {
        Self::single(Term::Diversity { tap: tap.into() })
    }

    /// Checks class ids, feature indices, taps and channels against a classifier's output
    /// before any optimization runs, naming the bad value and the valid range.
    pub fn validate(&self, output: &ClassifierOutput) -> Result<()> {
        for (_, term) in &self.terms {
            term.value(output)?;
        }
        Ok(())
    }

    /// The objective's value (a scalar tensor, differentiable) and each term's unweighted
    /// value, in the order of `terms`.
    pub fn evaluate(&self, output: &ClassifierOutput) -> Result<(Tensor, Vec<Tensor>)> {
        let mut total: Option<Tensor> = None;
        let mut values = Vec::with_capacity(self.terms.len());
        for (weight, term) in &self.terms {
            let value = term.value(output)?;
            let weighted = (&value * *weight)?;
            total = Some(match total {
                None => weighted,
                Some(t) => (t + weighted)?,
            });
            values.push(value);
        }
        match total {
            Some(t) => Ok((t, values)),
            None => candle_core::bail!("the objective is empty: give at least one term"),
        }
    }
}

impl Term {
    /// The term's batch-mean value as a scalar tensor.
    pub fn value(&self, output: &ClassifierOutput) -> Result<Tensor> {
        match self {
            Term::Logit(c) => output.logit(*c)?.mean_all(),
            Term::LogProbability(c) => {
                output.logit(*c)?; // range check with the classifier's message
                crate::ops::log_softmax_last_dim(&output.logits)?
                    .narrow(1, *c, 1)?
                    .mean_all()
            }
            Term::Features(indices) => {
                let width = output.features.dim(1)?;
                if indices.is_empty() {
                    candle_core::bail!("a features objective needs at least one feature index")
                }
                if let Some(bad) = indices.iter().find(|&&i| i >= width) {
                    candle_core::bail!(
                        "feature index {bad} is out of range: the pooled features have {width} \
                         entries (0..={})",
                        width - 1
                    )
                }
                // A repeated index would silently weigh that feature twice in the mean.
                if let Some((k, &dup)) = indices
                    .iter()
                    .enumerate()
                    .find(|(k, i)| indices[..*k].contains(i))
                {
                    candle_core::bail!(
                        "feature index {dup} is given twice (at positions {} and {}): each \
                         feature counts once",
                        indices.iter().position(|&i| i == dup).unwrap() + 1,
                        k + 1
                    )
                }
                let mut sum = output.features.narrow(1, indices[0], 1)?;
                for &i in &indices[1..] {
                    sum = (sum + output.features.narrow(1, i, 1)?)?;
                }
                (sum / indices.len() as f64)?.mean_all()
            }
            Term::Channel { tap, channel } => {
                let map = output.tap(tap)?;
                let channels = map.dim(1)?;
                if *channel >= channels {
                    candle_core::bail!(
                        "channel {channel} is out of range: tap `{tap}` has {channels} channels \
                         (0..={})",
                        channels - 1
                    )
                }
                map.narrow(1, *channel, 1)?.mean_all()
            }
            Term::Diversity { tap } => diversity(output.tap(tap)?),
        }
    }
}

/// Lucent's diversity: `-Σ_{i≠j} <G_i, G_j> / b` with each Gram matrix L2-normalized. Feature
/// maps `[b, c, ...]` give `[c, c]` Grams; token maps `[b, n, d]` likewise over tokens.
fn diversity(map: &Tensor) -> Result<Tensor> {
    let b = map.dim(0)?;
    if b < 2 {
        return Tensor::zeros((), map.dtype(), map.device());
    }
    let c = map.dim(1)?;
    let flat = map.reshape((b, c, ()))?;
    let grams = flat.matmul(&flat.t()?)?.reshape((b, c * c))?;
    let norms = grams.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let grams = grams.broadcast_div(&(norms + 1e-12)?)?;
    // Σ_{i≠j} <G_i, G_j> = |Σ_i G_i|² - Σ_i |G_i|².
    let total = grams.sum(0)?.sqr()?.sum_all()?;
    let own = grams.sqr()?.sum_all()?;
    ((total - own)? / b as f64)?.neg()
}

impl std::ops::Add for Objective {
    type Output = Objective;
    fn add(mut self, rhs: Objective) -> Objective {
        self.terms.extend(rhs.terms);
        self
    }
}

impl std::ops::Neg for Objective {
    type Output = Objective;
    fn neg(self) -> Objective {
        -1.0 * self
    }
}

impl std::ops::Sub for Objective {
    type Output = Objective;
    fn sub(self, rhs: Objective) -> Objective {
        self + (-rhs)
    }
}

impl std::ops::Mul<Objective> for f64 {
    type Output = Objective;
    fn mul(self, mut rhs: Objective) -> Objective {
        rhs.terms.iter_mut().for_each(|(w, _)| *w *= self);
        rhs
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Logit(c) => write!(f, "logit[{c}]"),
            Term::LogProbability(c) => write!(f, "log_p[{c}]"),
            Term::Features(i) if i.len() == 1 => write!(f, "feature[{}]", i[0]),
            Term::Features(i) => write!(f, "features{i:?}"),
            Term::Channel { tap, channel } => write!(f, "channel({tap}, {channel})"),
            Term::Diversity { tap } => write!(f, "diversity({tap})"),
        }
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, (w, term)) in self.terms.iter().enumerate() {
            let (sign, w) = if *w < 0.0 { ("-", -w) } else { ("+", *w) };
            match (k, sign) {
                (0, "-") => write!(f, "-")?,
                (0, _) => {}
                _ => write!(f, " {sign} ")?,
            }
            if w != 1.0 {
                write!(f, "{w}·")?;
            }
            write!(f, "{term}")?;
        }
        Ok(())
    }
}
