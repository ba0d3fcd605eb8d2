//! The world's trainer and the classifier under audit: a few steps lower the loss; the same
//! seed gives bit-identical weights; a resumed run ends where an uninterrupted one does; the
//! trainer's AdamW is candle-nn's update bit for bit; the saved folder loads through the
//! classifier-folder loader with the same outputs.

use candle_core::{Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use diffexplainer::models::classifiers::Classifier;
use diffexplainer::world::classifier::{self, Trainable};
use diffexplainer::world::net::Rows;
use diffexplainer::world::spec::WorldSpec;
use diffexplainer::world::train::{self, AdamW, Checkpointing, TrainConfig};
use diffexplainer::world::{Dataset, Split};

/// The default world, shrunk: few images, a narrower network.
fn small_spec() -> WorldSpec {
    let mut spec = WorldSpec::default_world();
    spec.splits.train = 96;
    spec.splits.validation = 48;
    spec.splits.balanced = 48;
    spec.classifier.widths = [4, 8, 8, 8];
    spec.classifier.stem_width = 4;
    spec.classifier.epochs = 2;
    spec.classifier.batch_size = 32;
    spec.validate("small").unwrap();
    spec
}

fn train_small(
    spec: &WorldSpec,
    config: &TrainConfig,
    ckpt: Option<&Checkpointing>,
) -> (Trainable, Vec<f32>) {
    let data = Dataset::new(spec, Split::Train, None);
    let model = Trainable::new(&classifier::resnet_config(spec), spec.classifier.seed).unwrap();
    let report = classifier::train_on(
        &model,
        &data.images().unwrap(),
        &data.labels().unwrap(),
        &classifier::preprocess(spec),
        config,
        ckpt,
        false,
    )
    .unwrap();
    (model, report.step_losses)
}

fn weights_bits(model: &Trainable) -> Vec<(String, Vec<u32>)> {
    let mut t: Vec<_> = model
        .tensors(0)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
        .map(|(n, t)| {
            let bits = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            (n, bits)
        })
        .collect();
    t.sort();
    t
}

#[test]
fn a_few_steps_lower_the_loss() {
    let spec = small_spec();
    // All 96 images as one batch, 8 steps: the loss must fall.
    let config = TrainConfig {
        epochs: 8,
        batch_size: 96,
        lr: 1e-2,
        weight_decay: 0.0,
        seed: 1,
        checkpoint_every: 0,
    };
    let (_, losses) = train_small(&spec, &config, None);
    assert_eq!(losses.len(), 8);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first > 1.5, "the first loss {first} is not near ln 6");
    assert!(last < first - 0.02, "the loss did not fall: {losses:?}");
}

#[test]
fn the_same_seed_gives_bit_identical_weights_and_resume_matches() {
    let spec = small_spec();
    let config = classifier::train_config(&spec);
    let (a, _) = train_small(&spec, &config, None);
    let (b, _) = train_small(&spec, &config, None);
    assert_eq!(weights_bits(&a), weights_bits(&b));
    let mut other = spec.clone();
    other.classifier.seed = 5;
    let (c, _) = train_small(&other, &classifier::train_config(&other), None);
    assert_ne!(weights_bits(&a), weights_bits(&c), "the seed has no effect");

    // Interrupted after 3 of the 6 steps (a run with checkpoint_every = 3 whose process "dies"
    // is emulated by training 3 steps' worth, then resuming in a fresh model).
    let dir = std::env::temp_dir().join(format!("dx-world-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = Checkpointing { dir: dir.clone() };
    let resumable = TrainConfig {
        checkpoint_every: 3,
        ..config.clone()
    };
    let (full, _) = train_small(&spec, &resumable, None);
    {
        // Run to step 3 only, by stopping through a failing loss at step 4.
        let data = Dataset::new(&spec, Split::Train, None);
        let model =
            Trainable::new(&classifier::resnet_config(&spec), spec.classifier.seed).unwrap();
        let (images, labels) = (data.images().unwrap(), data.labels().unwrap());
        let pre = classifier::preprocess(&spec);
        let net = model.net().unwrap();
        let mut calls = 0;
        let r = train::train(
            model.trainable_vars().unwrap(),
            model.buffers().unwrap(),
            96,
            &resumable,
            Some(&ckpt),
            "t",
            false,
            |idx| {
                calls += 1;
                if calls > 3 {
                    candle_core::bail!("interrupted")
                }
                let ids = Tensor::new(
                    idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    &Device::Cpu,
                )?;
                let x = Rows::from_nchw(&pre.forward(&images.index_select(&ids, 0)?)?)?;
                let logits = net.forward(&x, true)?;
                classifier::cross_entropy(&logits, &labels.index_select(&ids, 0)?)
            },
        );
        assert!(r.is_err());
    }
    assert!(dir.join("checkpoint.json").is_file());
    let data = Dataset::new(&spec, Split::Train, None);
    let resumed = Trainable::new(&classifier::resnet_config(&spec), spec.classifier.seed).unwrap();
    let report = classifier::train_on(
        &resumed,
        &data.images().unwrap(),
        &data.labels().unwrap(),
        &classifier::preprocess(&spec),
        &resumable,
        Some(&ckpt),
        false,
    )
    .unwrap();
    assert_eq!(report.resumed_at, 3);
    assert_eq!(report.step_losses.len(), 3);
    assert_eq!(
        weights_bits(&resumed),
        weights_bits(&full),
        "resume diverged"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn adamw_matches_candle_nn_bit_for_bit() {
    let x = Tensor::new(&[[0.3f32, -1.2, 0.7], [1.1, 0.2, -0.4]], &Device::Cpu).unwrap();
    let init = Tensor::new(&[0.5f32, -0.25, 0.125], &Device::Cpu).unwrap();
    let params = ParamsAdamW {
        lr: 0.05,
        weight_decay: 0.1,
        ..Default::default()
    };
    let (ours, theirs) = (
        Var::from_tensor(&init).unwrap(),
        Var::from_tensor(&init).unwrap(),
    );
    let mut a = AdamW::new(vec![("w".into(), ours.clone())], params.clone()).unwrap();
    let mut b = candle_nn::AdamW::new(vec![theirs.clone()], params).unwrap();
    let loss = |w: &Var| {
        x.matmul(&w.as_tensor().unsqueeze(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    for _ in 0..5 {
        a.step(&loss(&ours).backward().unwrap()).unwrap();
        b.step(&loss(&theirs).backward().unwrap()).unwrap();
    }
    let bits = |v: &Var| {
        v.as_tensor()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|f| f.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&ours), bits(&theirs));
    assert_ne!(
        ours.as_tensor().to_vec1::<f32>().unwrap(),
        init.to_vec1::<f32>().unwrap()
    );
}

#[test]
fn the_saved_folder_loads_with_the_same_outputs() {
    let spec = small_spec();
    let (model, _) = train_small(&spec, &classifier::train_config(&spec), None);
    let dir = std::env::temp_dir().join(format!("dx-world-folder-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let record = classifier::TrainingRecord {
        spec_fingerprint: spec.fingerprint(),
        train: classifier::train_config(&spec),
        init_seed: 0,
        threads: 1,
        epoch_losses: vec![],
        seconds: 0.0,
        accuracy: vec![],
    };
    classifier::save_folder(&spec, &model, &dir, &record).unwrap();
    let (loaded, pre) = classifier::load_for(&spec, &dir).unwrap();
    let images = Dataset::new(&spec, Split::Balanced, Some(12))
        .images()
        .unwrap();
    let ours = model
        .classifier()
        .unwrap()
        .forward(&classifier::preprocess(&spec).forward(&images).unwrap())
        .unwrap()
        .logits;
    let theirs = loaded
        .forward(&pre.forward(&images).unwrap())
        .unwrap()
        .logits;
    assert_eq!(
        ours.to_vec2::<f32>().unwrap(),
        theirs.to_vec2::<f32>().unwrap()
    );
    // Through the explainer's classifier spec too (`--classifier DIR`).
    let cs = diffexplainer::explain::bundle::ClassifierSpec::preset(dir.to_str().unwrap(), None)
        .unwrap();
    assert_eq!(
        (cs.arch.as_str(), cs.input_size),
        ("folder", spec.image_size)
    );
    let (c, _) = Classifier::from_dir(&dir, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(c.num_classes(), spec.classes.len());
    // A spec with other classes is refused, naming both lists.
    let mut other = spec.clone();
    other.classes.swap(0, 1);
    let err = format!("{:#}", classifier::load_for(&other, &dir).err().unwrap());
    assert!(err.contains("not the spec's"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Training-step timing on the default world's classifier, one batch of 128 (a benchmark, not
/// a test: `cargo test --release --test world_train -- --ignored --nocapture bench`). "rebuilt"
/// is the former step: the inference ResNet rebuilt from the variables each step (batch norm
/// folded into an affine), candle's conv2d backward; "net" is `world::net` (train-mode batch
/// norm, im2col + GEMM convolutions).
#[test]
#[ignore = "a benchmark; prints timings"]
fn bench_training_step() {
    let mut spec = WorldSpec::default_world();
    spec.splits.train = 128;
    let data = Dataset::new(&spec, Split::Train, None);
    let (images, labels) = (data.images().unwrap(), data.labels().unwrap());
    let pre = classifier::preprocess(&spec);
    let model = Trainable::new(&classifier::resnet_config(&spec), 0).unwrap();
    let net = model.net().unwrap();
    let x = pre.forward(&images).unwrap();
    let rows = Rows::from_nchw(&x).unwrap();
    let mut opt = AdamW::new(model.trainable_vars().unwrap(), ParamsAdamW::default()).unwrap();
    let reps = 5;
    for (name, rebuilt) in [("rebuilt", true), ("net", false)] {
        if std::env::var("WORLD_BENCH").is_ok_and(|only| only != name) {
            continue;
        }
        let (mut fwd, mut bwd, mut step) = (0f64, 0f64, 0f64);
        for rep in 0..=reps {
            let t = std::time::Instant::now();
            let logits = if rebuilt {
                model.classifier().unwrap().forward(&x).unwrap().logits
            } else {
                net.forward(&rows, true).unwrap()
            };
            let loss = classifier::cross_entropy(&logits, &labels).unwrap();
            let _ = loss.to_scalar::<f32>().unwrap();
            let t1 = std::time::Instant::now();
            let grads = loss.backward().unwrap();
            let t2 = std::time::Instant::now();
            opt.step(&grads).unwrap();
            let t3 = std::time::Instant::now();
            if rep > 0 {
                // Repetition 0 warms up.
                fwd += (t1 - t).as_secs_f64();
                bwd += (t2 - t1).as_secs_f64();
                step += (t3 - t2).as_secs_f64();
            }
        }
        let per = |s: f64| s * 1e3 / reps as f64;
        let total = (fwd + bwd + step) / reps as f64;
        println!(
            "{name}: forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms; {:.0} images/s",
            per(fwd),
            per(bwd),
            per(step),
            128.0 / total
        );
    }
}
