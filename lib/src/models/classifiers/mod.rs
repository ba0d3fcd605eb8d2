//! Image classifiers with hidden-feature taps (torchvision architectures and names).

pub mod preprocess;

pub use preprocess::Preprocess;
