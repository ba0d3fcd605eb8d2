//! Neural activation maps (Salient ImageNet, Singla & Feizi, ICLR 2022, Sec. 3): where in an
//! image a classifier's penultimate feature fires. For a ResNet, feature `i` of the pooled
//! penultimate vector is the spatial mean of channel `i` of the last stage (`layer4`), so its map
//! is that channel, `[b, h', w']` (7x7 for a 224 px ResNet-50), upsampled bilinearly (PyTorch
//! `F.interpolate(mode="bilinear", align_corners=False)`) to the image's `[b, H, W]`.
//!
//! [`share_inside`] scores a map against a segmentation mask of the class object:
//! `Σ map·mask / Σ map` per image, in `[0, 1]` for a non-negative map (a ResNet's last stage
//! ends in a ReLU) and a mask in `[0, 1]` (soft masks such as CLIPSeg's probabilities are
//! fine). A high share says the feature looks at the object (core), a low one at something else
//! (spurious).

use candle_core::{bail, DType, Result, Tensor};

use crate::models::classifiers::ClassifierOutput;
use crate::ops;

/// Channel `feature` of `stage` (`[b, c, h', w']`, e.g. ResNet's `layer4`) upsampled to
/// `image_size`: `[b, H, W]`, same dtype. Differentiable.
pub fn activation_map(
    stage: &Tensor,
    feature: usize,
    image_size: (usize, usize),
) -> Result<Tensor> {
    let (_, c, _, _) = stage.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "activation map: the stage must be [batch, channels, height, width], got {:?}",
            stage.dims()
        ))
    })?;
    if feature >= c {
        bail!("activation map: feature {feature} is out of range: the stage has {c} channels (0..={})", c.saturating_sub(1))
    }
    let channel = stage.narrow(1, feature, 1)?;
    ops::resize_bilinear(&channel, image_size, false)?.squeeze(1)
}

/// The activation map of a penultimate feature from a classifier's output: the `layer4` tap of a
/// ResNet. Other architectures have no spatial penultimate stage and are an error.
pub fn feature_map(
    output: &ClassifierOutput,
    feature: usize,
    image_size: (usize, usize),
) -> Result<Tensor> {
    let stage = output.tap("layer4").map_err(|e| {
        candle_core::Error::Msg(format!(
            "feature maps need a ResNet's last stage (`layer4`), whose channels the penultimate \
             features average: {e}"
        ))
    })?;
    activation_map(stage, feature, image_size)
}

/// `Σ map·mask / Σ map` per image: `map` and `mask` `[b, H, W]` (mask in `[0, 1]`), result `[b]`
/// in f64 on the host. Errors: shapes differ, a negative map value or a mask value outside
/// `[0, 1]` (naming the image), or an image whose map is zero everywhere (no activation to share).
pub fn share_inside(map: &Tensor, mask: &Tensor) -> Result<Vec<f64>> {
    if map.dims() != mask.dims() || map.rank() != 3 {
        bail!(
            "share inside mask: map {:?} and mask {:?} must both be [batch, height, width]",
            map.dims(),
            mask.dims()
        )
    }
    let map = map
        .to_dtype(DType::F64)?
        .flatten_from(1)?
        .to_vec2::<f64>()?;
    let mask = mask
        .to_dtype(DType::F64)?
        .flatten_from(1)?
        .to_vec2::<f64>()?;
    let mut shares = Vec::with_capacity(map.len());
    for (i, (a, m)) in map.iter().zip(&mask).enumerate() {
        if let Some(v) = a.iter().find(|v| **v < 0.0 || !v.is_finite()) {
            bail!("share inside mask: image {i}'s activation map holds {v} (it must be finite and >= 0)")
        }
        if let Some(v) = m.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            bail!("share inside mask: image {i}'s mask holds {v} (it must lie in [0, 1])")
        }
        let total: f64 = a.iter().sum();
        if total == 0.0 {
            bail!("share inside mask: image {i}'s activation map is zero everywhere (the feature does not fire)")
        }
        let inside: f64 = a.iter().zip(m).map(|(a, m)| a * m).sum();
        shares.push(inside / total);
    }
    Ok(shares)
}
