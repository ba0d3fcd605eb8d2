//! Runs every parity case under tests/parity/cases (format: docs/parity-format.md): our modules
//! against PyTorch / torchvision / transformers outputs and input gradients.

use std::path::Path;

#[test]
fn every_parity_case_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/cases");
    let cases = diffexplainer::parity::find_cases(&root).unwrap();
    assert!(
        !cases.is_empty(),
        "no parity cases under {}",
        root.display()
    );
    let mut failures = Vec::new();
    for case in &cases {
        match diffexplainer::parity::run_case(case) {
            Ok(report) => {
                print!("{report}");
                if !report.passed() {
                    failures.push(report.to_string());
                }
            }
            Err(e) => failures.push(format!("{}: {e:#}", case.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} parity cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Every kind the format documents has at least one committed case, so a kind cannot silently
/// lose its proof.
#[test]
fn every_kind_has_a_case() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/cases");
    let mut seen = std::collections::HashSet::new();
    for case in diffexplainer::parity::find_cases(&root).unwrap() {
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap())
                .unwrap();
        seen.insert(spec["kind"].as_str().unwrap().to_string());
    }
    let missing: Vec<&str> = diffexplainer::parity::KINDS
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| !seen.contains(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "kinds without a parity case: {missing:?}"
    );
}

/// The end-to-end LCM case also passes with UNet gradient checkpointing (the option recomputes
/// every ResNet and transformer in backward): same numbers through all four steps.
#[test]
fn lcm_sample_decode_passes_with_gradient_checkpointing() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/cases/lcm_sample_decode");
    let dir = std::env::temp_dir().join(format!("lcm_sample_decode_ckpt_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    spec["options"]["gradient_checkpointing"] = serde_json::Value::Bool(true);
    std::fs::write(dir.join("case.json"), spec.to_string()).unwrap();
    let report = diffexplainer::parity::run_case(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    print!("{report}");
    assert!(report.passed(), "{report}");
}

/// A copy of a committed case with its case.json changed by `edit`, in a fresh temp folder.
fn edited_case(name: &str, tag: &str, edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/parity/cases")
        .join(name);
    let dir = std::env::temp_dir()
        .join(format!("dx-parity-{tag}-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    edit(&mut spec);
    std::fs::write(dir.join("case.json"), spec.to_string()).unwrap();
    dir
}

#[test]
fn a_misspelled_case_key_is_an_error_not_a_skipped_check() {
    // `grad_input` for `grad_inputs`: the gradient comparison would silently be off.
    let dir = edited_case("op_max_pool2d_k2", "misspelled", |spec| {
        let g = spec.as_object_mut().unwrap().remove("grad_inputs").unwrap();
        spec["grad_input"] = g;
    });
    let err = format!("{:#}", diffexplainer::parity::run_case(&dir).unwrap_err());
    assert!(err.contains("unknown field `grad_input`"), "{err}");
    assert!(err.contains("case.json"), "{err}");

    let dir = edited_case("op_max_pool2d_k2", "tolerance", |spec| {
        spec["tolerance"]["grad_abs"] = serde_json::json!(1.0);
    });
    let err = format!("{:#}", diffexplainer::parity::run_case(&dir).unwrap_err());
    assert!(err.contains("unknown field `grad_abs`"), "{err}");
}

#[test]
fn a_non_finite_reference_is_an_error_not_a_match() {
    // f64::max skips NaN: a NaN in expected.safetensors once compared as error 0 and passed.
    let dir = edited_case("op_max_pool2d_k2", "nan", |_| {});
    let path = dir.join("expected.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let y = tensors.get("y").expect("the case compares `y`").clone();
    let nan = (y.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert("y".to_string(), nan);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = format!("{:#}", diffexplainer::parity::run_case(&dir).unwrap_err());
    assert!(
        err.contains("reference value") && err.contains("NaN"),
        "{err}"
    );
}

#[test]
fn an_option_the_kind_does_not_read_is_an_error() {
    let dir = edited_case("op_max_pool2d_k2", "option", |spec| {
        spec["options"]["dilation"] = serde_json::json!(2);
    });
    let err = format!("{:#}", diffexplainer::parity::run_case(&dir).unwrap_err());
    assert!(
        err.contains("`dilation`") && err.contains("op.max_pool2d") && err.contains("kernel"),
        "{err}"
    );
    // An option a kind reads only for another input is no effect either: `preprocess` with
    // `pixel_values` (resnet18_tiny feeds normalized pixels).
    let dir = edited_case("resnet18_tiny", "preprocess", |spec| {
        spec["options"] = serde_json::json!({"preprocess": {"resize": 32}});
    });
    let err = format!("{:#}", diffexplainer::parity::run_case(&dir).unwrap_err());
    assert!(err.contains("`preprocess`"), "{err}");
}

#[test]
fn a_reference_tensor_left_out_of_case_json_is_an_error() {
    // expected.safetensors holds grad.x; with grad_inputs emptied it would go unchecked.
    let dir = edited_case("op_max_pool2d_k2", "unused", |spec| {
        spec["grad_inputs"] = serde_json::json!([]);
    });
    let err = format!("{:#}", diffexplainer::parity::run_case(&dir).unwrap_err());
    assert!(
        err.contains("`grad.x`") && err.contains("grad_inputs"),
        "{err}"
    );
}

#[test]
fn markdown_table_keeps_an_error_row() {
    let bad = edited_case("op_max_pool2d_k2", "markdown", |spec| {
        spec["grad_input"] = serde_json::json!(["x"]);
    });
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/cases/op_silu");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_diffexplainer"))
        .arg("parity")
        .arg("--markdown")
        .arg(&bad)
        .arg(&good)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    // Header, separator, one row per case, a blank line, then the summary.
    assert_eq!(lines.len(), 6, "{text}");
    for row in &lines[..4] {
        assert!(row.starts_with('|') && row.ends_with('|'), "{row}");
        let unescaped = row.replace("\\|", "");
        assert_eq!(unescaped.matches('|').count(), 7, "six columns: {row}");
    }
    assert!(
        lines[2].contains("op_max_pool2d_k2")
            && lines[2].contains("ERROR")
            && lines[2].contains("grad_input"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].contains("op_silu") && lines[3].contains("pass"),
        "{}",
        lines[3]
    );
    assert_eq!(lines[4], "");
    assert!(lines[5].contains("1 passed, 1 failed"), "{}", lines[5]);
}
