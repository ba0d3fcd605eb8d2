//! A class's **predictive features**, as Salient ImageNet defines them (Singla & Feizi, ICLR
//! 2022, Sec. 3) and ShapesWorld's ground truth measures them ([`crate::world::truth`]): for
//! class `c`, penultimate feature `j` scores `mean over class-c images of feature_j × W[c, j]`
//! (`W` the final linear layer, `[classes, features]`); the class's top-k features are the k
//! highest scores (ties: lower index first).

use candle_core::{bail, Device, IndexOp, Result, Tensor};

use crate::models::classifiers::{Classifier, Network};

/// `mean_i pooled[i, j] · weights[j]` for every feature `j`: `pooled` `[n, C]` (the pooled
/// penultimate features of `n` images of the class), `weights` `[C]` (the class's row of the
/// final layer). f32 on the host.
pub fn predictive_scores(pooled: &Tensor, weights: &Tensor) -> Result<Vec<f32>> {
    pooled
        .broadcast_mul(&weights.unsqueeze(0)?)?
        .mean(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()
}

/// Feature indices by decreasing score, ties by index; the first `k`.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// The number of penultimate features of a ResNet (its final layer's inputs). Other
/// architectures have no spatial last stage for activation maps and are an error.
pub fn feature_count(classifier: &Classifier) -> Result<usize> {
    match &classifier.network {
        Network::ResNet(r) => r.fc().weight().dim(1),
        _ => bail!(
            "spurious-feature labelling needs a ResNet classifier (feature activation maps come \
             from its last stage, `layer4`); this classifier is a {}",
            match &classifier.network {
                Network::Vgg(_) => "VGG",
                _ => "ViT",
            }
        ),
    }
}

/// The class's `k` most predictive features (with their scores) on `images` `[n, 3, H, W]` in
/// `[0, 1]` of that class, through `preprocess`. Errors: not a ResNet, a class out of range,
/// `k` of 0 or above the feature count, no images.
pub fn top_features(
    classifier: &Classifier,
    preprocess: &crate::models::classifiers::Preprocess,
    images: &Tensor,
    class: usize,
    k: usize,
) -> Result<Vec<(usize, f64)>> {
    let width = feature_count(classifier)?;
    classifier.check_class(class)?;
    if k == 0 || k > width {
        bail!("top-k: k must lie in 1..={width} (the classifier's penultimate features), got {k}")
    }
    if images.dim(0)? == 0 {
        bail!("top-k: no images of class {class} to measure the features on")
    }
    let Network::ResNet(r) = &classifier.network else {
        unreachable!("feature_count checked the architecture")
    };
    let out = classifier.forward(&preprocess.forward(images)?)?;
    let pooled = out.features.to_device(&Device::Cpu)?;
    let w = r.fc().weight().to_device(&Device::Cpu)?.i(class)?;
    let scores = predictive_scores(&pooled, &w.to_dtype(pooled.dtype())?)?;
    Ok(top_k(&scores, k)
        .into_iter()
        .map(|j| (j, scores[j] as f64))
        .collect())
}
