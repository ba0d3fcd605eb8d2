//! Spurious-feature discovery: which of a classifier's features lie on the class object (core)
//! and which on the background or a co-occurring object (spurious).
//!
//! - [`feature_maps`]: a penultimate feature's activation map on an image and the share of it
//!   inside an object mask.
//! - [`salient_imagenet`]: the Salient ImageNet MTurk annotations (Singla & Feizi, ICLR 2022) as
//!   a reference, and agreement metrics between its labels and ours.

pub mod feature_maps;
pub mod salient_imagenet;
