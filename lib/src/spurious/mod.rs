//! Spurious-feature discovery: which of a classifier's features lie on the class object (core)
//! and which on the background or a co-occurring object (spurious).
//!
//! - [`salient_imagenet`]: the Salient ImageNet MTurk annotations (Singla & Feizi, ICLR 2022) as
//!   a reference, and agreement metrics between its labels and ours.

pub mod salient_imagenet;
