//! Objective algebra: values against direct computations, gradients by finite differences, and
//! errors naming the bad class id, feature, tap or channel.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use diffexplainer::explain::objective::Term;
use diffexplainer::explain::Objective;
use diffexplainer::models::classifiers::ClassifierOutput;
use diffexplainer::testing::{check_gradient, pseudo_random_tensor};

fn output(logits: &Tensor, features: &Tensor, map: &Tensor) -> ClassifierOutput {
    ClassifierOutput {
        logits: logits.clone(),
        features: features.clone(),
        hidden: BTreeMap::from([("layer4".to_string(), map.clone())]),
    }
}

fn sample() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    (
        pseudo_random_tensor(&[3, 5], 2.0, 1, &dev).unwrap(),
        pseudo_random_tensor(&[3, 6], 1.0, 2, &dev).unwrap(),
        pseudo_random_tensor(&[3, 4, 2, 2], 1.0, 3, &dev).unwrap(),
    )
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

#[test]
fn algebra_composes_weights_and_prints_like_the_expression() {
    let o = Objective::logit(3) - 0.5 * Objective::logit(1) + 0.1 * Objective::diversity("layer4");
    assert_eq!(o.terms.len(), 3);
    assert_eq!(o.terms[1], (-0.5, Term::Logit(1)));
    assert_eq!(
        o.to_string(),
        "logit[3] - 0.5·logit[1] + 0.1·diversity(layer4)"
    );
    assert_eq!((-Objective::neuron(2)).to_string(), "-feature[2]");
}

#[test]
fn values_match_direct_computations() {
    let (logits, features, map) = sample();
    let out = output(&logits, &features, &map);
    let l = logits.to_vec2::<f64>().unwrap();
    let f = features.to_vec2::<f64>().unwrap();

    let contrast = Objective::logit(3) - 0.5 * Objective::logit(1);
    let (total, terms) = contrast.evaluate(&out).unwrap();
    let mean =
        |col: usize, m: &Vec<Vec<f64>>| m.iter().map(|r| r[col]).sum::<f64>() / m.len() as f64;
    assert!((scalar(&terms[0]) - mean(3, &l)).abs() < 1e-12);
    assert!((scalar(&total) - (mean(3, &l) - 0.5 * mean(1, &l))).abs() < 1e-12);

    let (v, _) = Objective::features([0, 4]).evaluate(&out).unwrap();
    assert!((scalar(&v) - (mean(0, &f) + mean(4, &f)) / 2.0).abs() < 1e-12);

    // log p = logit - logsumexp(logits)
    let (v, _) = Objective::log_probability(2).evaluate(&out).unwrap();
    let want: f64 = l
        .iter()
        .map(|r| r[2] - r.iter().map(|x| x.exp()).sum::<f64>().ln())
        .sum::<f64>()
        / 3.0;
    assert!((scalar(&v) - want).abs() < 1e-12);

    let (v, _) = Objective::channel("layer4", 1).evaluate(&out).unwrap();
    let want = map.narrow(1, 1, 1).unwrap().mean_all().unwrap();
    assert!((scalar(&v) - scalar(&want)).abs() < 1e-12);
}

#[test]
fn diversity_matches_pairwise_gram_cosines() {
    let (logits, features, map) = sample();
    let (v, _) = Objective::diversity("layer4")
        .evaluate(&output(&logits, &features, &map))
        .unwrap();
    // Direct: -Σ_{i≠j} cos(G_i, G_j) / b.
    let b = 3;
    let grams: Vec<Vec<f64>> = (0..b)
        .map(|i| {
            let x = map.get(i).unwrap().reshape((4, 4)).unwrap();
            let g = x
                .matmul(&x.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let n = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            g.iter().map(|v| v / n).collect()
        })
        .collect();
    let mut sum = 0.0;
    for i in 0..b {
        for j in 0..b {
            if i != j {
                sum += grams[i]
                    .iter()
                    .zip(&grams[j])
                    .map(|(a, c)| a * c)
                    .sum::<f64>();
            }
        }
    }
    assert!(
        (scalar(&v) + sum / b as f64).abs() < 1e-9,
        "{} vs {}",
        scalar(&v),
        -sum / b as f64
    );
    // One image: nothing to be diverse from.
    let one = output(
        &logits.narrow(0, 0, 1).unwrap(),
        &features.narrow(0, 0, 1).unwrap(),
        &map.narrow(0, 0, 1).unwrap(),
    );
    assert_eq!(
        scalar(&Objective::diversity("layer4").evaluate(&one).unwrap().0),
        0.0
    );
}

#[test]
fn gradients_match_finite_differences() {
    let (logits, features, map) = sample();
    let objective = Objective::log_probability(2) - 0.3 * Objective::logit(4);
    let check = check_gradient(
        |l| {
            objective
                .evaluate(&output(l, &features, &map))
                .map(|(v, _)| v)
        },
        &logits,
        1e-6,
        64,
    )
    .unwrap();
    assert!(
        check.scale > 1e-3 && check.max_rel_error < 1e-6,
        "{check:?}"
    );
    let diversity = Objective::diversity("layer4") + Objective::channel("layer4", 2);
    let check = check_gradient(
        |m| {
            diversity
                .evaluate(&output(&logits, &features, m))
                .map(|(v, _)| v)
        },
        &map,
        1e-6,
        64,
    )
    .unwrap();
    assert!(
        check.scale > 1e-3 && check.max_rel_error < 1e-6,
        "{check:?}"
    );
}

#[test]
fn bad_targets_are_named_with_the_valid_range() {
    let (logits, features, map) = sample();
    let out = output(&logits, &features, &map);
    let err = |o: Objective| o.validate(&out).unwrap_err().to_string();
    let e = err(Objective::logit(5));
    assert!(e.contains("class id 5") && e.contains("0..=4"), "{e}");
    let e = err(Objective::features([1, 9]));
    assert!(e.contains("feature index 9") && e.contains("0..=5"), "{e}");
    let e = err(Objective::channel("layer9", 0));
    assert!(e.contains("layer9") && e.contains("layer4"), "{e}");
    let e = err(Objective::channel("layer4", 4));
    assert!(e.contains("channel 4") && e.contains("0..=3"), "{e}");
    let e = Objective { terms: vec![] }
        .evaluate(&out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn repeated_or_out_of_range_feature_indices_are_refused() {
    let (logits, features, map) = sample();
    let out = output(&logits, &features, &map);
    let err = Objective::features([1, 3, 1])
        .validate(&out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("feature index 1 is given twice") && err.contains("positions 1 and 3"),
        "{err}"
    );
    let width = features.dim(1).unwrap();
    let err = Objective::features([0, width])
        .validate(&out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("feature index {width} is out of range")),
        "{err}"
    );
    Objective::features([0, 1]).validate(&out).unwrap();
}
