//! The classifier's training network (`world::net`): its im2col convolution against candle's
//! conv2d (output and both gradients), train-mode batch norm's gradient against finite
//! differences, the running statistics against a hand computation, and the saved folder in the
//! inference ResNet against the training network in evaluation mode.

use candle_core::{DType, Device, Tensor, Var};
use diffexplainer::models::classifiers::Classifier;
use diffexplainer::world::classifier::{self, Trainable};
use diffexplainer::world::net::{batch_norm_train, conv2d, Rows};
use diffexplainer::world::spec::WorldSpec;
use diffexplainer::world::{Dataset, Split};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    let mut rng = diffexplainer::rng::SeededRng::new(seed);
    let n = dims.iter().product();
    Tensor::from_vec(rng.normal_vec(n), dims, &Device::Cpu).unwrap()
}

#[test]
fn im2col_conv_matches_candle_conv2d_and_its_gradients() {
    // Odd and even sizes, stride 1 and 2, 3×3 and 1×1 kernels. Square inputs: candle's own
    // conv2d backward (the reference) derives the output padding from the height alone.
    for (k, stride, pad, h, w) in [
        (3, 1, 1, 7, 7),
        (3, 2, 1, 7, 7),
        (3, 2, 1, 6, 6),
        (1, 2, 0, 6, 6),
    ] {
        let x = Var::from_tensor(&randn(1, &[2, 3, h, w])).unwrap();
        let wt = Var::from_tensor(&randn(2, &[4, 3, k, k])).unwrap();
        let probe = randn(
            3,
            &[
                2,
                4,
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
            ],
        );

        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), pad, stride, 1, 1)
            .unwrap();
        let g_theirs = (&theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let ours = conv2d(
            &Rows::from_nchw(x.as_tensor()).unwrap(),
            wt.as_tensor(),
            stride,
            pad,
        )
        .unwrap()
        .to_nchw()
        .unwrap();
        let g_ours = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let case = format!("k {k} stride {stride} pad {pad} {h}×{w}");
        assert_eq!(ours.dims(), theirs.dims(), "{case}");
        assert!(max_abs_diff(&ours, &theirs) < 1e-5, "{case}: output");
        for (name, v) in [("input", &x), ("weight", &wt)] {
            let (a, b) = (g_ours.get(v).unwrap(), g_theirs.get(v).unwrap());
            assert!(max_abs_diff(a, b) < 1e-4, "{case}: {name} gradient");
        }
    }
}

#[test]
fn train_mode_batch_norm_gradient_matches_finite_differences() {
    // f64, so central differences are accurate to ~1e-9.
    let x0 = randn(4, &[6, 3]).to_dtype(DType::F64).unwrap();
    let x0 = ((x0 * 2.0).unwrap() + 0.5).unwrap();
    let weight = Tensor::new(&[1.5f64, -0.7, 0.3], &Device::Cpu).unwrap();
    let bias = Tensor::new(&[0.1f64, 0.2, -0.3], &Device::Cpu).unwrap();
    let probe = randn(5, &[6, 3]).to_dtype(DType::F64).unwrap();
    let loss = |x: &Tensor| -> Tensor {
        let (y, _, _) = batch_norm_train(x, &weight, &bias, 1e-5).unwrap();
        // A non-linear loss, so the gradient through the mean and the variance matters.
        (y.sqr().unwrap() * &probe).unwrap().sum_all().unwrap()
    };
    let x = Var::from_tensor(&x0).unwrap();
    let grad = loss(x.as_tensor()).backward().unwrap();
    let analytic: Vec<f64> = grad
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let flat: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    for i in 0..flat.len() {
        let at = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            let t = Tensor::from_vec(v, (6, 3), &Device::Cpu).unwrap();
            loss(&t).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
            "element {i}: finite differences {numeric}, autograd {}",
            analytic[i]
        );
    }
    // Its output per channel has mean bias and standard deviation |weight|.
    let (y, _, _) = batch_norm_train(&x0, &weight, &bias, 0.0).unwrap();
    let mean: Vec<f64> = y.mean(0).unwrap().to_vec1().unwrap();
    for (m, b) in mean.iter().zip([0.1, 0.2, -0.3]) {
        assert!((m - b).abs() < 1e-12);
    }
}

fn small_spec() -> WorldSpec {
    let mut spec = WorldSpec::default_world();
    spec.splits.train = 64;
    spec.classifier.widths = [4, 8, 8, 8];
    spec.classifier.stem_width = 4;
    spec.classifier.epochs = 1;
    spec.classifier.batch_size = 32;
    spec.validate("small").unwrap();
    spec
}

fn var(model: &Trainable, name: &str) -> Tensor {
    model.tensors(0).unwrap()[name].clone()
}

#[test]
fn running_statistics_follow_torchvision_and_load_into_the_inference_resnet() {
    let spec = small_spec();
    let model = Trainable::new(&classifier::resnet_config(&spec), 3).unwrap();
    let net = model.net().unwrap();
    let pre = classifier::preprocess(&spec);
    let images = Dataset::new(&spec, Split::Train, Some(16))
        .images()
        .unwrap();
    let x = pre.forward(&images).unwrap();

    // By hand: the stem conv's output statistics over (n, h, w), unbiased variance, momentum
    // 0.1 from the initial running mean 0 and variance 1.
    let stem = x.conv2d(&var(&model, "conv1.weight"), 1, 1, 1, 1).unwrap();
    let count = (stem.elem_count() / stem.dim(1).unwrap()) as f64;
    let mean = stem.mean_keepdim((0, 2, 3)).unwrap();
    let unbiased = (stem
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .sum((0, 2, 3))
        .unwrap()
        / (count - 1.0))
        .unwrap();
    let mean = mean.flatten_all().unwrap();
    net.forward(&Rows::from_nchw(&x).unwrap(), true).unwrap();
    let expected_mean = (mean * 0.1).unwrap();
    let expected_var = ((unbiased * 0.1).unwrap() + 0.9).unwrap();
    assert!(max_abs_diff(&var(&model, "bn1.running_mean"), &expected_mean) < 1e-5);
    assert!(max_abs_diff(&var(&model, "bn1.running_var"), &expected_var) < 1e-4);
    // Every norm moved off its initial statistics.
    for (name, t) in model.tensors(0).unwrap() {
        if name.ends_with("running_var") {
            let v: Vec<f32> = t.to_vec1().unwrap();
            assert!(v.iter().any(|v| *v != 1.0), "{name} was not updated");
        }
    }

    // Train a little more (so the statistics and weights are not the initial ones), then save:
    // the inference ResNet (running statistics folded into an affine) gives the training
    // network's evaluation-mode output.
    let data = Dataset::new(&spec, Split::Train, None);
    classifier::train_on(
        &model,
        &data.images().unwrap(),
        &data.labels().unwrap(),
        &pre,
        &classifier::train_config(&spec),
        None,
        false,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("dx-world-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let record = classifier::TrainingRecord {
        spec_fingerprint: spec.fingerprint(),
        train: classifier::train_config(&spec),
        init_seed: 3,
        threads: 1,
        epoch_losses: vec![],
        seconds: 0.0,
        accuracy: vec![],
    };
    classifier::save_folder(&spec, &model, &dir, &record).unwrap();
    let saved =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let tracked = &saved["layer1.0.bn2.num_batches_tracked"];
    assert_eq!(tracked.dtype(), DType::I64);
    assert_eq!(
        tracked.to_scalar::<i64>().unwrap(),
        2,
        "2 steps of 32 images"
    );
    let (loaded, folder) = Classifier::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let loaded_pre = loaded.preprocess(folder.input_size);
    let inference = loaded
        .forward(&loaded_pre.forward(&images).unwrap())
        .unwrap()
        .logits;
    let eval = net.forward(&Rows::from_nchw(&x).unwrap(), false).unwrap();
    assert!(
        max_abs_diff(&inference, &eval) < 1e-4,
        "inference ResNet {inference} vs training network in eval mode {eval}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
