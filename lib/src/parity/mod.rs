//! Parity cases: our modules against their reference libraries, as data (see
//! `docs/parity-format.md`). A case folder names a module `kind`; [`run_case`] builds that module
//! from the folder's config and weights, runs the inputs, backpropagates the cotangents and
//! compares outputs and input gradients with what the reference computed.

mod kinds;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;

pub use kinds::KINDS;

/// The f32 bars of the foundation: forward 1e-4, input gradients 1e-3 (relative to scale).
pub const DEFAULT_FORWARD_REL: f64 = 1e-4;
pub const DEFAULT_GRAD_REL: f64 = 1e-3;

/// `case.json`. Unknown keys are errors: a misspelled `grad_input` would otherwise switch the
/// gradient comparison off and let a failing case pass.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSpec {
    pub kind: String,
    #[serde(default)]
    pub reference: String,
    #[serde(default)]
    pub options: serde_json::Value,
    pub outputs: Vec<String>,
    #[serde(default)]
    pub grad_inputs: Vec<String>,
    #[serde(default)]
    pub tolerance: Tolerance,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    #[serde(default = "default_forward")]
    pub forward_rel: f64,
    #[serde(default = "default_grad")]
    pub grad_rel: f64,
}

fn default_forward() -> f64 {
    DEFAULT_FORWARD_REL
}
fn default_grad() -> f64 {
    DEFAULT_GRAD_REL
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            forward_rel: DEFAULT_FORWARD_REL,
            grad_rel: DEFAULT_GRAD_REL,
        }
    }
}

/// Everything a kind's runner gets: the case's files, loaded.
pub struct CaseInputs<'a> {
    pub dir: &'a Path,
    pub config: serde_json::Value,
    pub options: &'a serde_json::Value,
    /// `weights.safetensors` as a VarBuilder (f32, CPU), if the case has weights.
    pub weights: Option<candle_nn::VarBuilder<'static>>,
    /// Inputs by name; those in `grad_inputs` are `Var`s' tensors (tracked by autograd).
    pub inputs: HashMap<String, Tensor>,
    /// The option names the runner asked for: any other option in `case.json` had no effect,
    /// which is an error (see [`run_case_on`]).
    read_options: std::cell::RefCell<Vec<String>>,
}

impl CaseInputs<'_> {
    pub fn input(&self, name: &str) -> anyhow::Result<&Tensor> {
        self.inputs.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: inputs.safetensors has no tensor `{name}`",
                self.dir.display()
            )
        })
    }

    pub fn weights(&self) -> anyhow::Result<candle_nn::VarBuilder<'static>> {
        self.weights.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: this kind needs weights.safetensors",
                self.dir.display()
            )
        })
    }

    /// Parses `config.json` into a kind's config type, naming the file on error.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_value(self.config.clone()).map_err(|e| {
            anyhow::anyhow!(
                "{}: config.json does not fit this kind: {e}",
                self.dir.display()
            )
        })
    }

    pub fn option<T: serde::de::DeserializeOwned>(&self, name: &str) -> anyhow::Result<Option<T>> {
        self.read_options.borrow_mut().push(name.to_string());
        match self.options.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                anyhow::anyhow!("{}: case.json option `{name}`: {e}", self.dir.display())
            }),
        }
    }
}

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Output name, or `grad.<input>`.
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    pub rel: f64,
    pub bar: f64,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.rel < self.bar
    }
}

#[derive(Debug, Clone)]
pub struct CaseReport {
    pub dir: PathBuf,
    pub kind: String,
    pub reference: String,
    pub comparisons: Vec<Comparison>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        !self.comparisons.is_empty() && self.comparisons.iter().all(Comparison::passed)
    }
}

impl std::fmt::Display for CaseReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} [{}] {}",
            self.dir.display(),
            self.kind,
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        for c in &self.comparisons {
            writeln!(
                f,
                "  {:<28} {:>20}  max_abs {:>10.3e}  rel {:>10.3e}  (bar {:.0e}) {}",
                c.name,
                format!("{:?}", c.shape),
                c.max_abs,
                c.rel,
                c.bar,
                if c.passed() { "ok" } else { "FAIL" }
            )?;
        }
        Ok(())
    }
}

/// All case folders (those holding a `case.json`) directly under `root`, sorted.
pub fn find_cases(root: impl AsRef<Path>) -> anyhow::Result<Vec<PathBuf>> {
    let root = root.as_ref();
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| anyhow::anyhow!("{}: {e}", root.display()))? {
        let path = entry?.path();
        if path.join("case.json").is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Runs one case folder on the CPU in f32.
pub fn run_case(dir: impl AsRef<Path>) -> anyhow::Result<CaseReport> {
    run_case_on(dir, &Device::Cpu)
}

/// Runs one case folder in f32 on `device` (the CUDA path is checked with the same bars).
pub fn run_case_on(dir: impl AsRef<Path>, device: &Device) -> anyhow::Result<CaseReport> {
    let dir = dir.as_ref();
    let spec: CaseSpec = read_json(&dir.join("case.json"))?;
    let runner = kinds::runner(&spec.kind).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: unknown kind `{}` (known kinds: {})",
            dir.join("case.json").display(),
            spec.kind,
            KINDS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        )
    })?;
    let config_path = dir.join("config.json");
    let config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        serde_json::json!({})
    };
    let weights_path = dir.join("weights.safetensors");
    let weights = if weights_path.is_file() {
        Some(
            crate::weights::Checkpoint::open_safetensors(&[&weights_path])?
                .into_var_builder(DType::F32, &device),
        )
    } else {
        None
    };

    let raw_inputs = load_safetensors(&dir.join("inputs.safetensors"))?;
    let mut vars: HashMap<String, Var> = HashMap::new();
    let mut inputs = HashMap::new();
    for (name, tensor) in raw_inputs {
        let tensor = tensor.to_device(device)?;
        if spec.grad_inputs.contains(&name) {
            let var = Var::from_tensor(&tensor)?;
            inputs.insert(name.clone(), var.as_tensor().clone());
            vars.insert(name, var);
        } else {
            inputs.insert(name, tensor);
        }
    }
    for name in &spec.grad_inputs {
        if !vars.contains_key(name) {
            anyhow::bail!(
                "{}: grad input `{name}` is not in inputs.safetensors",
                dir.display()
            )
        }
    }

    match &spec.options {
        serde_json::Value::Object(_) | serde_json::Value::Null => {}
        other => anyhow::bail!(
            "{}: `options` must be an object, found {other}",
            dir.join("case.json").display()
        ),
    }
    let case = CaseInputs {
        dir,
        config,
        options: &spec.options,
        weights,
        inputs,
        read_options: Default::default(),
    };
    let outputs = runner(&case)
        .map_err(|e| anyhow::anyhow!("{}: running kind `{}`: {e:#}", dir.display(), spec.kind))?;
    if let serde_json::Value::Object(given) = &spec.options {
        let read = case.read_options.borrow();
        let mut unknown: Vec<&str> = given
            .keys()
            .map(String::as_str)
            .filter(|k| !read.iter().any(|r| r == k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            let mut known: Vec<&str> = read.iter().map(String::as_str).collect();
            known.sort();
            known.dedup();
            anyhow::bail!(
                "{}: option(s) {} have no effect for kind `{}` here (it read: {})",
                dir.join("case.json").display(),
                unknown
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.kind,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        }
    }

    let expected = load_safetensors(&dir.join("expected.safetensors"))?;
    let cotangents = load_safetensors(&dir.join("cotangents.safetensors"))?;
    // Every reference tensor is compared: one left out (a `grad.x` whose input is missing from
    // `grad_inputs`) would be a check silently skipped.
    let mut unused: Vec<&String> = expected
        .keys()
        .filter(|k| {
            !spec.outputs.contains(k)
                && !k
                    .strip_prefix("grad.")
                    .is_some_and(|g| spec.grad_inputs.iter().any(|i| i == g))
        })
        .collect();
    if !unused.is_empty() {
        unused.sort();
        anyhow::bail!(
            "{}: expected.safetensors holds {} that case.json does not compare (list outputs \
             in `outputs`, inputs whose gradient is checked in `grad_inputs`)",
            dir.display(),
            unused
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
    let mut comparisons = Vec::new();
    let mut objective: Option<Tensor> = None;
    for name in &spec.outputs {
        let ours = outputs.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: kind `{}` produced no output `{name}`",
                dir.display(),
                spec.kind
            )
        })?;
        let want = get(&expected, name, dir, "expected.safetensors")?;
        comparisons.push(compare(name, ours, want, spec.tolerance.forward_rel)?);
        if !spec.grad_inputs.is_empty() {
            let cot = get(&cotangents, name, dir, "cotangents.safetensors")?;
            let term = ours.mul(&cot.to_device(device)?)?.sum_all()?;
            objective = Some(match objective {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
    }
    if let Some(objective) = objective {
        let grads = objective.backward()?;
        for name in &spec.grad_inputs {
            let grad_name = format!("grad.{name}");
            let want = get(&expected, &grad_name, dir, "expected.safetensors")?;
            let ours = match grads.get(vars[name].as_tensor()) {
                Some(g) => g.clone(),
                // No path from the input to the outputs: autograd returns nothing. Compare a
                // zero gradient, which fails against any non-zero reference, as it should.
                None => want.zeros_like()?,
            };
            comparisons.push(compare(&grad_name, &ours, want, spec.tolerance.grad_rel)?);
        }
    }
    Ok(CaseReport {
        dir: dir.to_path_buf(),
        kind: spec.kind,
        reference: spec.reference,
        comparisons,
    })
}

/// Max absolute error and the error relative to the expected tensor's scale.
pub fn compare(name: &str, ours: &Tensor, want: &Tensor, bar: f64) -> anyhow::Result<Comparison> {
    if ours.dims() != want.dims() {
        anyhow::bail!(
            "`{name}`: shape {:?}, reference has {:?}",
            ours.dims(),
            want.dims()
        )
    }
    let ours = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let want_v = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(i) = ours.iter().position(|v| !v.is_finite()) {
        anyhow::bail!("`{name}`: our value at flat index {i} is {}", ours[i])
    }
    // f64::max ignores NaN, so a NaN reference would compare as a perfect match.
    if let Some(i) = want_v.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "`{name}`: the reference value at flat index {i} is {} (a broken case)",
            want_v[i]
        )
    }
    let max_abs = ours
        .iter()
        .zip(&want_v)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = want_v.iter().map(|v| v.abs()).fold(0.0, f64::max);
    Ok(Comparison {
        name: name.to_string(),
        shape: want.dims().to_vec(),
        max_abs,
        rel: max_abs / scale.max(1e-12),
        bar,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn load_safetensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn get<'a>(
    map: &'a HashMap<String, Tensor>,
    name: &str,
    dir: &Path,
    file: &str,
) -> anyhow::Result<&'a Tensor> {
    map.get(name)
        .ok_or_else(|| anyhow::anyhow!("{}: {file} has no tensor `{name}`", dir.display()))
}
