//! Spurious-feature discovery: which of a classifier's features lie on the class object (core)
//! and which on the background or a co-occurring object (spurious).
//!
//! - [`feature_maps`]: a penultimate feature's activation map on an image and the share of it
//!   inside an object mask.
//! - [`predictive`]: a class's most predictive features (Salient ImageNet's definition, also
//!   ShapesWorld's ground truth's).
//! - [`labelling`]: the core / spurious rule over the shares of `n` images (score, t-interval
//!   margin, `uncertain`), and the [`labelling::ObjectSegmenter`] trait (CLIPSeg implements it).
//! - [`labeller`]: the run: explainer images per feature, segmentation, shares, a table.
//! - [`table`]: the per-class table: notebook rendering, HTML, CSV, JSON, saved folders.
//! - [`salient_imagenet`]: the Salient ImageNet MTurk annotations (Singla & Feizi, ICLR 2022) as
//!   a reference, and agreement metrics between its labels and ours.

pub mod feature_maps;
pub mod labeller;
pub mod labelling;
pub mod predictive;
pub mod salient_imagenet;
pub mod table;

pub use labeller::{label_class, ClassTarget, LabelConfig};
pub use labelling::{CoreCriterion, LabelRule, ObjectSegmenter, ShareSummary, Verdict};
pub use table::{ClassTable, Evidence, LabelRow};
