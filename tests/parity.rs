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
