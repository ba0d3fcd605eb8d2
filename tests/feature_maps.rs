//! Neural activation maps of a tiny random ResNet's penultimate features and the share of
//! activation inside a mask: 1 for a full mask, 0 for an empty one, a hand computation for a
//! half mask, and errors for bad input.

use candle_core::{DType, Device, Tensor};
use diffexplainer::models::classifiers::{
    BlockKind, Classifier, ClassifierConfig, ResNetConfig, Stem,
};
use diffexplainer::spurious::feature_maps::{activation_map, feature_map, share_inside};
use diffexplainer::testing::{pseudo_random_tensor, random_var_builder};

fn tiny_resnet() -> Classifier {
    let cfg = ClassifierConfig::ResNet(ResNetConfig {
        block: BlockKind::Basic,
        layers: [1, 1, 1, 1],
        widths: [4, 4, 8, 8],
        stem_width: 4,
        num_classes: 3,
        stem: Stem::Imagenet,
        strides: [1, 2, 2, 2],
    });
    Classifier::new(random_var_builder(DType::F64, &Device::Cpu), &cfg).unwrap()
}

fn image() -> Tensor {
    pseudo_random_tensor(&[2, 3, 64, 64], 1.0, 1, &Device::Cpu).unwrap()
}

#[test]
fn activation_map_is_the_upsampled_last_stage_channel() {
    let model = tiny_resnet();
    let out = model.forward(&image()).unwrap();
    let layer4 = out.tap("layer4").unwrap();
    assert_eq!(layer4.dims(), &[2, 8, 2, 2]);
    let map = feature_map(&out, 5, (64, 64)).unwrap();
    assert_eq!(map.dims(), &[2, 64, 64]);
    // The map's mean equals the pooled feature: bilinear upsampling by an integer factor
    // preserves the mean of a 2x2 grid (each source pixel covers a quarter by symmetry).
    let means = map.mean((1, 2)).unwrap().to_vec1::<f64>().unwrap();
    let features = out
        .features
        .narrow(1, 5, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (m, f) in means.iter().zip(&features) {
        assert!((m - f).abs() < 1e-12, "map mean {m} vs pooled feature {f}");
    }
    let err = feature_map(&out, 8, (64, 64)).unwrap_err().to_string();
    assert!(
        err.contains("feature 8") && err.contains("8 channels"),
        "{err}"
    );
}

#[test]
fn share_is_one_for_a_full_mask_zero_for_an_empty_one_and_matches_a_hand_computation() {
    let model = tiny_resnet();
    let out = model.forward(&image()).unwrap();
    // A feature that fires on both images.
    let map = (0..8)
        .map(|f| feature_map(&out, f, (64, 64)).unwrap())
        .find(|m| {
            m.sum((1, 2))
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .all(|&s| s > 0.0)
        })
        .expect("some feature fires on both images");
    let full = map.ones_like().unwrap();
    let empty = map.zeros_like().unwrap();
    for s in share_inside(&map, &full).unwrap() {
        assert!((s - 1.0).abs() < 1e-12, "{s}");
    }
    assert_eq!(share_inside(&map, &empty).unwrap(), vec![0.0, 0.0]);

    // Left half of the image: the share is the left half's activation over the total.
    let left: Vec<f64> = (0..2 * 64 * 64)
        .map(|i| if i % 64 < 32 { 1.0 } else { 0.0 })
        .collect();
    let left = Tensor::from_vec(left, (2, 64, 64), &Device::Cpu).unwrap();
    let shares = share_inside(&map, &left).unwrap();
    let values = map.to_vec3::<f64>().unwrap();
    for (b, share) in shares.iter().enumerate() {
        let (mut inside, mut total) = (0.0, 0.0);
        for row in &values[b] {
            for (x, v) in row.iter().enumerate() {
                total += v;
                if x < 32 {
                    inside += v;
                }
            }
        }
        assert!(
            (share - inside / total).abs() < 1e-12,
            "image {b}: {share} vs {}",
            inside / total
        );
        assert!(*share > 0.0 && *share < 1.0);
    }
}

#[test]
fn a_known_map_gives_the_known_share() {
    // A 1x2 stage [1, 3] upsampled to 2x4: rows [1, 1.5, 2.5, 3]; the mask keeps x = 3.
    let stage = Tensor::new(&[[[[1.0f64, 3.0]]]], &Device::Cpu).unwrap();
    let map = activation_map(&stage, 0, (2, 4)).unwrap();
    assert_eq!(
        map.to_vec3::<f64>().unwrap()[0][0],
        vec![1.0, 1.5, 2.5, 3.0]
    );
    let mask = Tensor::new(
        &[[[0.0f64, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]],
        &Device::Cpu,
    )
    .unwrap();
    let share = share_inside(&map, &mask).unwrap();
    assert!((share[0] - 6.0 / 16.0).abs() < 1e-12, "{share:?}");
}

#[test]
fn bad_maps_and_masks_are_errors_naming_the_image() {
    let map = Tensor::ones((2, 4, 4), DType::F64, &Device::Cpu).unwrap();
    let err = share_inside(
        &map,
        &Tensor::ones((2, 4, 5), DType::F64, &Device::Cpu).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("[2, 4, 4]") && err.contains("[2, 4, 5]"),
        "{err}"
    );
    let mut m = vec![0.5f64; 32];
    m[20] = 1.5;
    let bad_mask = Tensor::from_vec(m, (2, 4, 4), &Device::Cpu).unwrap();
    let err = share_inside(&map, &bad_mask).unwrap_err().to_string();
    assert!(err.contains("image 1") && err.contains("1.5"), "{err}");
    let mut z = vec![1.0f64; 32];
    z[..16].iter_mut().for_each(|v| *v = 0.0);
    let silent = Tensor::from_vec(z, (2, 4, 4), &Device::Cpu).unwrap();
    let err = share_inside(&silent, &map).unwrap_err().to_string();
    assert!(
        err.contains("image 0") && err.contains("zero everywhere"),
        "{err}"
    );
}
