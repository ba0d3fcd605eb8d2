//! Small random models shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use diffexplainer::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffexplainer::testing::pseudo_random_tensor;

/// Builds a model from a VarMap whose parameters get pseudo-random values (VarMap starts at
/// zeros, which would hide every bug).
pub fn random_model<M>(build: impl Fn(VarBuilder) -> candle_core::Result<M>, scale: f64) -> M {
    let varmap = VarMap::new();
    drop(build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap());
    // Seeds follow the sorted parameter names: HashMap order differs between processes.
    let data = varmap.data().lock().unwrap();
    let mut named: Vec<_> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    for (seed, (name, var)) in named.into_iter().enumerate() {
        let mut values =
            pseudo_random_tensor(var.dims(), scale, seed as u64 + 1, &Device::Cpu).unwrap();
        if name.ends_with("running_var") {
            values = (values.abs().unwrap() + 0.5).unwrap(); // variances are positive
        }
        var.set(&values.to_dtype(DType::F32).unwrap()).unwrap();
    }
    drop(data);
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap()
}

/// A tiny random CLIP text encoder over the real 49408-token vocabulary, so the embedded
/// tokenizer's ids are valid.
pub fn tiny_clip() -> ClipTextModel {
    let cfg: ClipTextConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 49408, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "eos_token_id": 2
    }))
    .unwrap();
    random_model(|vb| ClipTextModel::new(vb, &cfg), 0.5)
}

/// Asserts that `lib/src/ops/<name>.ptx` is what nvcc makes from `<name>.cu` (the command in
/// the .cu header) and that ptxas assembles it for sm_90. Needs nvcc
/// (`/opt/cuda13/nvidia/cu13/bin/nvcc`, or set NVCC), which CI does not install: the tests that
/// call this are `#[ignore]`d and run with `-- --ignored`.
pub fn assert_committed_ptx_is_up_to_date(name: &str) {
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "/opt/cuda13/nvidia/cu13/bin/nvcc".into());
    assert!(
        std::path::Path::new(&nvcc).exists(),
        "no nvcc at {nvcc}: install the CUDA toolchain or set NVCC"
    );
    let ops_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops");
    let root = ops_dir.join("../../..");
    let out = std::env::temp_dir().join(format!("dx_{name}_{}.ptx", std::process::id()));
    let status = std::process::Command::new(&nvcc)
        .current_dir(root)
        .args(["-ptx", "-arch=sm_80", "-o"])
        .arg(&out)
        .arg(format!("lib/src/ops/{name}.cu"))
        .status()
        .unwrap();
    assert!(status.success(), "nvcc failed on {name}.cu");
    let fresh = std::fs::read_to_string(&out).unwrap();
    let committed = std::fs::read_to_string(ops_dir.join(format!("{name}.ptx"))).unwrap();
    assert!(
        fresh == committed,
        "lib/src/ops/{name}.ptx is stale: regenerate it with the command in {name}.cu"
    );
    let ptxas = std::path::Path::new(&nvcc).with_file_name("ptxas");
    let cubin = out.with_extension("cubin");
    let status = std::process::Command::new(ptxas)
        .args(["-arch=sm_90", "-o"])
        .arg(&cubin)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "ptxas -arch=sm_90 rejected the PTX");
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(cubin);
}

/// Largest absolute elementwise difference of two tensors of one shape (f32 comparison).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
