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
