//! The classifier input pipeline as DiffExplainer uses it, differentiable end to end:
//! a decoded image in [0, 1] → bilinear resize (antialiased, like torchvision's `Resize` on
//! tensors) → per-channel mean/std normalization.

use candle_core::{Result, Tensor};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Square side the image is resized to (256 for the CNNs, 224 for ViT-B/16); `None` keeps it.
    pub size: Option<usize>,
    pub antialias: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// ImageNet normalization after resizing to `size`×`size` with antialiasing.
    pub fn imagenet(size: usize) -> Self {
        Self {
            size: Some(size),
            antialias: true,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// `image`: `[b, 3, h, w]` in [0, 1]. Returns the normalized classifier input.
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let (_, channels, _, _) = image.dims4()?;
        if channels != 3 {
            candle_core::bail!(
                "preprocess: expected an RGB image [b, 3, h, w], got shape {:?}",
                image.dims()
            )
        }
        let resized = match self.size {
            Some(s) => crate::ops::resize_bilinear(image, (s, s), self.antialias)?,
            None => image.clone(),
        };
        let mean = Tensor::new(&self.mean, image.device())?
            .to_dtype(image.dtype())?
            .reshape((3, 1, 1))?;
        let std = Tensor::new(&self.std, image.device())?
            .to_dtype(image.dtype())?
            .reshape((3, 1, 1))?;
        resized.broadcast_sub(&mean)?.broadcast_div(&std)
    }
}
