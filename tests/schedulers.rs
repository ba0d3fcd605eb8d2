//! Schedulers and the sampling loop against diffusers 0.42.1, step by step
//! (`tests/fixtures/schedulers/*.json`, written by `scripts/make_scheduler_fixtures.py`), and
//! finite-difference checks of the gradient through a whole sampling run.

use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use diffexplainer::sampling::{
    sample, DdimScheduler, EulerAncestralScheduler, LcmScheduler, SampleOutput, SamplerOptions,
    Scheduler, SchedulerConfig, SchedulerKind,
};
use diffexplainer::testing::{check_gradient, pseudo_random_tensor};
use serde_json::Value;

const OUTPUT_REL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/schedulers")
}

fn load(name: &str) -> Value {
    let path = fixtures().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn kind(v: &Value) -> SchedulerKind {
    match v["scheduler"].as_str().unwrap() {
        "ddim" => SchedulerKind::Ddim,
        "lcm" => SchedulerKind::Lcm,
        "euler_ancestral" => SchedulerKind::EulerAncestral,
        other => panic!("unknown scheduler {other}"),
    }
}

fn config(v: &Value) -> SchedulerConfig {
    SchedulerConfig::from_json(&v["config"].to_string()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn tensor(v: &Value, shape: &[usize]) -> Tensor {
    let data: Vec<f32> = floats(v).into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn shape(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// `max |a - b| / max |b|`, the parity-format error measure.
fn rel_error(ours: &Tensor, expected: &Tensor) -> f64 {
    let diff = (ours.to_dtype(DType::F64).unwrap() - expected.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = expected
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale.max(1e-12)
}

fn scalar_rel(ours: f64, expected: f64) -> f64 {
    (ours - expected).abs() / expected.abs().max(1e-12)
}

/// The coefficients a scheduler reports for step `i`, under the fixture's names.
fn our_coefficients(v: &Value, i: usize) -> Vec<(&'static str, f64)> {
    let cfg = config(v);
    let steps = v["steps"].as_u64().unwrap() as usize;
    match kind(v) {
        SchedulerKind::Ddim => {
            let mut s = DdimScheduler::new(&cfg).unwrap();
            s.set_timesteps(steps).unwrap();
            let c = s.coefficients(i).unwrap();
            vec![
                ("alpha_prod_t", c.alpha_prod_t),
                ("alpha_prod_t_prev", c.alpha_prod_t_prev),
            ]
        }
        SchedulerKind::Lcm => {
            let mut s = LcmScheduler::new(&cfg).unwrap();
            s.set_timesteps(steps).unwrap();
            let c = s.coefficients(i).unwrap();
            vec![
                ("alpha_prod_t", c.alpha_prod_t),
                ("alpha_prod_t_prev", c.alpha_prod_t_prev),
                ("c_skip", c.c_skip),
                ("c_out", c.c_out),
            ]
        }
        SchedulerKind::EulerAncestral => {
            let mut s = EulerAncestralScheduler::new(&cfg).unwrap();
            s.set_timesteps(steps).unwrap();
            let c = s.coefficients(i).unwrap();
            vec![
                ("sigma", c.sigma),
                ("sigma_next", c.sigma_next),
                ("sigma_up", c.sigma_up),
                ("sigma_down", c.sigma_down),
            ]
        }
    }
}

fn alphas_cumprod(v: &Value) -> Vec<f64> {
    let cfg = config(v);
    match kind(v) {
        SchedulerKind::Ddim => DdimScheduler::new(&cfg)
            .unwrap()
            .config()
            .alphas_cumprod
            .clone(),
        SchedulerKind::Lcm => LcmScheduler::new(&cfg)
            .unwrap()
            .config()
            .alphas_cumprod
            .clone(),
        SchedulerKind::EulerAncestral => EulerAncestralScheduler::new(&cfg)
            .unwrap()
            .config()
            .alphas_cumprod
            .clone(),
    }
}

fn check_step_case(name: &str) {
    let v = load(name);
    let shape = shape(&v);
    let steps = v["steps"].as_u64().unwrap() as usize;
    let mut s = kind(&v).build(&config(&v)).unwrap();
    s.set_timesteps(steps).unwrap();

    assert_eq!(s.timesteps(), floats(&v["timesteps"]), "{name}: timesteps");
    // torch's f32 noise schedule, to within an f32 rounding or two.
    let ours = alphas_cumprod(&v);
    let expected = floats(&v["alphas_cumprod"]);
    assert_eq!(ours.len(), expected.len(), "{name}: alphas_cumprod length");
    let worst = ours
        .iter()
        .zip(&expected)
        .map(|(&a, &b)| scalar_rel(a, b))
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "{name}: alphas_cumprod rel error {worst:.3e}");
    let sigma = v["init_noise_sigma"].as_f64().unwrap();
    assert!(
        scalar_rel(s.init_noise_sigma(), sigma) < 1e-6,
        "{name}: init_noise_sigma {} vs {sigma}",
        s.init_noise_sigma()
    );

    let mut sample_in = tensor(&v["initial_sample"], &shape);
    for (i, step) in v["per_step"].as_array().unwrap().iter().enumerate() {
        for (key, ours) in our_coefficients(&v, i) {
            let expected = step["coefficients"][key].as_f64().unwrap();
            // sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels when sigma >> sigma_next, and
            // diffusers computes it in f32: judge it (and sigma_up) at the scale it is used, the
            // step size sigma_down - sigma.
            let scale = match key {
                "sigma_down" | "sigma_up" => step["coefficients"]["sigma"].as_f64().unwrap(),
                _ => expected.abs(),
            };
            let err = (ours - expected).abs() / scale.max(1e-12);
            assert!(
                err < 1e-6,
                "{name} step {i}: {key} = {ours} but diffusers has {expected}"
            );
        }
        let model_output = tensor(&step["model_output"], &shape);
        let noise = tensor(&step["noise"], &shape);
        if s.needs_noise(i) {
            assert!(
                step["noise_used"].as_bool().unwrap(),
                "{name} step {i}: we add noise where diffusers draws none"
            );
        }
        let scaled = s.scale_model_input(&sample_in, i).unwrap();
        let err = rel_error(&scaled, &tensor(&step["scaled_model_input"], &shape));
        assert!(
            err < OUTPUT_REL,
            "{name} step {i}: scale_model_input rel error {err:.3e}"
        );
        let prev = s.step(&model_output, i, &sample_in, Some(&noise)).unwrap();
        let expected = tensor(&step["prev_sample"], &shape);
        let err = rel_error(&prev, &expected);
        assert!(
            err < OUTPUT_REL,
            "{name} step {i}: prev_sample rel error {err:.3e}"
        );
        // Continue from diffusers' own sample, so errors do not compound.
        sample_in = expected;
    }
}

macro_rules! step_cases {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            check_step_case(stringify!($name));
        }
    )*};
}

step_cases!(
    ddim_sd15_4,
    ddim_sd15_50,
    ddim_sd15_trailing_3,
    ddim_sd15_linspace_7,
    ddim_sd15_sample_4,
    ddim_sd21_v_5,
    ddim_linear_alpha1_4,
    lcm_sd15_4,
    lcm_sd15_1,
    lcm_sd15_8,
    lcm_sd15_v_3,
    lcm_sd15_sample_2,
    lcm_sd15_orig25_3,
    euler_a_sdturbo_1,
    euler_a_sdturbo_4,
    euler_a_sd15_5,
    euler_a_sd15_leading_3,
    euler_a_sd21_v_3,
);

/// The fake model of the fixture runs (`make_scheduler_fixtures.py::fake_model`).
fn fake_model(x: &Tensor, t: f64, c: &Tensor) -> Result<Tensor> {
    x.affine(0.5, 0.002 * t)?.tanh()?.add(&c.affine(0.3, 0.0)?)
}

fn check_run(name: &str) {
    let v = load(name);
    let shape = shape(&v);
    let steps = v["steps"].as_u64().unwrap() as usize;
    let mut s = kind(&v).build(&config(&v)).unwrap();
    let mut options = SamplerOptions::new(steps)
        .with_step_noises(
            v["step_noises"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| tensor(n, &shape))
                .collect(),
        )
        .with_intermediates();
    if let Some(g) = v["guidance_scale"].as_f64() {
        options = options.with_guidance(g, tensor(&v["uncond"], &shape));
    }
    let SampleOutput {
        latents,
        intermediates,
    } = sample(
        &mut s,
        fake_model,
        &tensor(&v["initial_noise"], &shape),
        &tensor(&v["cond"], &shape),
        &options,
    )
    .unwrap();
    assert_eq!(s.timesteps(), floats(&v["timesteps"]), "{name}: timesteps");
    let expected = v["intermediates"].as_array().unwrap();
    assert_eq!(intermediates.len(), expected.len(), "{name}: intermediates");
    for (i, (ours, exp)) in intermediates.iter().zip(expected).enumerate() {
        let err = rel_error(ours, &tensor(exp, &shape));
        assert!(
            err < OUTPUT_REL,
            "{name}: latents after step {i}: rel error {err:.3e}"
        );
    }
    let err = rel_error(&latents, &tensor(&v["final"], &shape));
    assert!(
        err < OUTPUT_REL,
        "{name}: final latents rel error {err:.3e}"
    );
}

#[test]
fn run_lcm_sd15_4() {
    check_run("run_lcm_sd15_4");
}

#[test]
fn run_lcm_sd15_4_cfg() {
    check_run("run_lcm_sd15_4_cfg");
}

#[test]
fn run_euler_a_sdturbo_1() {
    check_run("run_euler_a_sdturbo_1");
}

#[test]
fn run_euler_a_sdturbo_3_cfg() {
    check_run("run_euler_a_sdturbo_3_cfg");
}

#[test]
fn run_ddim_sd15_5() {
    check_run("run_ddim_sd15_5");
}

// ---- gradients through a whole run -------------------------------------------------------

fn hub_config(file: &str) -> SchedulerConfig {
    SchedulerConfig::from_file(fixtures().join("configs").join(file)).unwrap()
}

fn input(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    pseudo_random_tensor(shape, scale, seed, &Device::Cpu).unwrap()
}

/// An analytic stand-in for the UNet: latents [1, 4, 2, 2], cond [b, 3, 8] (a token sequence);
/// `eps = tanh(0.5 x + 0.002 t + mean_seq(cond) W)`, nonlinear in both.
fn analytic_denoiser(x: &Tensor, t: f64, c: &Tensor) -> Result<Tensor> {
    let w = input(&[8, 16], 0.5, 99);
    let proj = c.mean(1)?.matmul(&w)?.reshape(x.dims())?;
    x.affine(0.5, 0.002 * t)?.add(&proj)?.tanh()
}

fn assert_gradient_through_run(
    name: &str,
    kind: SchedulerKind,
    cfg: &str,
    options: SamplerOptions,
) {
    let noise = input(&[1, 4, 2, 2], 1.0, 1);
    let cond = input(&[1, 3, 8], 1.0, 2);
    let run = |c: &Tensor| -> Result<Tensor> {
        let mut s = kind.build(&hub_config(cfg))?;
        Ok(sample(&mut s, analytic_denoiser, &noise, c, &options)?.latents)
    };
    let check = check_gradient(run, &cond, 1e-6, 24).unwrap();
    assert!(
        check.scale > 1e-3,
        "{name}: the gradient is ~0 (scale {}), the check proves nothing",
        check.scale
    );
    assert!(
        check.max_rel_error < 1e-6,
        "{name}: d(latents)/d(cond) differs from finite differences by {:.3e} over {} coords",
        check.max_rel_error,
        check.checked
    );
}

fn f64_noises(n: usize) -> Vec<Tensor> {
    (0..n)
        .map(|i| input(&[1, 4, 2, 2], 1.0, 10 + i as u64))
        .collect()
}

#[test]
fn gradient_through_lcm_4_steps() {
    assert_gradient_through_run(
        "lcm 4 steps",
        SchedulerKind::Lcm,
        "sd15.json",
        SamplerOptions::new(4).with_step_noises(f64_noises(4)),
    );
}

#[test]
fn gradient_through_lcm_4_steps_with_guidance() {
    assert_gradient_through_run(
        "lcm 4 steps, guidance 1.5",
        SchedulerKind::Lcm,
        "sd15.json",
        SamplerOptions::new(4)
            .with_step_noises(f64_noises(4))
            .with_guidance(1.5, input(&[1, 3, 8], 1.0, 3)),
    );
}

#[test]
fn gradient_through_euler_ancestral() {
    for steps in [1, 3] {
        assert_gradient_through_run(
            &format!("euler ancestral {steps} steps"),
            SchedulerKind::EulerAncestral,
            "sd_turbo.json",
            SamplerOptions::new(steps).with_step_noises(f64_noises(steps)),
        );
    }
}

#[test]
fn gradient_through_ddim_v_prediction() {
    assert_gradient_through_run(
        "ddim v-prediction 5 steps",
        SchedulerKind::Ddim,
        "sd21.json",
        SamplerOptions::new(5),
    );
}

// ---- configs and errors ------------------------------------------------------------------

#[test]
fn hub_configs_parse() {
    let sd15 = hub_config("sd15.json");
    assert_eq!(sd15.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(sd15.steps_offset, Some(1));
    let mut lcm = LcmScheduler::new(&sd15).unwrap();
    lcm.set_timesteps(4).unwrap();
    assert_eq!(lcm.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
    let mut turbo = EulerAncestralScheduler::new(&hub_config("sd_turbo.json")).unwrap();
    turbo.set_timesteps(1).unwrap();
    assert_eq!(turbo.timesteps(), &[999.0]);
    assert!(!turbo.needs_noise(0));
    assert_eq!(
        SchedulerKind::from_class_name("LCMScheduler").unwrap(),
        SchedulerKind::Lcm
    );
    let err = SchedulerKind::from_class_name("PNDMScheduler")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("PNDMScheduler"), "{err}");
}

#[test]
fn clip_sample_is_refused() {
    // DDIM's own default is clip_sample = true: a config that does not turn it off is refused.
    let err = DdimScheduler::new(&SchedulerConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("clip_sample"), "{err}");
    let cfg = SchedulerConfig::from_json(r#"{"clip_sample": true}"#).unwrap();
    assert!(LcmScheduler::new(&cfg).is_err());
}

#[test]
fn missing_noise_is_an_error() {
    let mut s = LcmScheduler::new(&hub_config("sd15.json")).unwrap();
    s.set_timesteps(4).unwrap();
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = s.step(&x, 0, &x, None).err().unwrap().to_string();
    assert!(err.contains("step 0") && err.contains("noise"), "{err}");
    // The last step adds none.
    s.step(&x, 3, &x, None).unwrap();
    // The sampler checks up front, before calling the denoiser.
    let mut s = LcmScheduler::new(&hub_config("sd15.json")).unwrap();
    let err = sample(
        &mut s,
        |_: &Tensor, _: f64, _: &Tensor| -> Result<Tensor> { panic!("denoiser called") },
        &x,
        &x,
        &SamplerOptions::new(4).with_step_noises(vec![x.clone()]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("[0, 1, 2]"), "{err}");
}

#[test]
fn bad_step_counts_are_errors() {
    let mut s = LcmScheduler::new(&hub_config("sd15.json")).unwrap();
    assert!(s.set_timesteps(51).is_err());
    assert!(s.set_timesteps(0).is_err());
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = s.step(&x, 0, &x, Some(&x)).err().unwrap().to_string();
    assert!(err.contains("set_timesteps"), "{err}");
}
