//! The `diffexplainer` binary: `explain` on the embedded tiny default writes a record that
//! `show` and `tokens` read; Ctrl-C cancels and still writes the record; bad arguments fail
//! before anything is written, naming the bad value and what would be valid.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffexplainer"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn explain_on_the_tiny_default_then_show_and_tokens() {
    let out = temp_dir("explain");
    let o = run(&[
        "explain",
        "--class",
        "3",
        "--iterations",
        "3",
        "--tokens",
        "2",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["summary"]["iterations"], 3);
    assert_eq!(json["summary"]["stop"], "Finished");
    assert_eq!(
        json["summary"]["explanation"]["nearest"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    for f in [
        "config.json",
        "metrics.csv",
        "prompt.safetensors",
        "summary.json",
        "best.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    let o = run(&["show", out.to_str().unwrap(), "--reproduce"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("Finished after 3 of 3"), "{text}");
    assert!(text.contains("bit for bit identical"), "{text}");
    assert!(text.contains("logit[3]"), "{text}");

    let o = run(&["tokens", out.to_str().unwrap(), "--top", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(e["nearest"][0].as_array().unwrap().len(), 2);
    assert_eq!(e, json["summary"]["explanation"].clone().tap_top(2));

    // The prompt file alone does not name its model: refused without model options...
    let o = run(&["tokens", out.join("prompt.safetensors").to_str().unwrap()]);
    assert!(
        !o.status.success() && stderr(&o).contains("does not record the model"),
        "{}",
        stderr(&o)
    );
    // ...and read with the models named on the command line (the tiny default).
    let o = run(&[
        "tokens",
        out.join("prompt.safetensors").to_str().unwrap(),
        "--tiny",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("prompt: A texture of "),
        "{}",
        stdout(&o)
    );

    // A corrupted record: `show` names the file.
    std::fs::write(out.join("config.json"), "{").unwrap();
    let o = run(&["show", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("config.json"), "{}", stderr(&o));
}

/// The explanation with only the first `n` tokens per vector (what `tokens --top n` shows).
trait TapTop {
    fn tap_top(self, n: usize) -> Self;
}
impl TapTop for serde_json::Value {
    fn tap_top(mut self, n: usize) -> Self {
        for v in self["nearest"].as_array_mut().unwrap() {
            v.as_array_mut().unwrap().truncate(n);
        }
        self
    }
}

#[test]
fn bare_explain_runs_the_embedded_default() {
    let out = temp_dir("bare");
    let o = bin()
        .args(["explain", "--iterations", "2"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no objective given"), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("logit[3]") && text.contains("prompt: A texture of "),
        "{text}"
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_cancels_at_the_next_iteration_and_still_writes_the_record() {
    let out = temp_dir("ctrlc");
    let child = bin()
        .args([
            "explain",
            "--neuron",
            "4",
            "--iterations",
            "100000",
            "--out",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few iterations are recorded.
    let start = std::time::Instant::now();
    loop {
        let rows = std::fs::read_to_string(out.join("metrics.csv"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if rows >= 3 {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "no iterations recorded within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    // The record is finished, and the exit status says the run was interrupted (128 + SIGINT).
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stdout(&o).contains("Cancelled after"), "{}", stdout(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["stop"], "Cancelled");
    assert!(out.join("prompt.safetensors").is_file());
}

#[test]
fn bad_arguments_name_the_bad_value_and_write_nothing() {
    let out = temp_dir("bad");
    let o = run(&["explain", "--class", "12", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("class id 12") && e.contains("0..=9"), "{e}");
    assert!(!out.exists(), "nothing is written for a bad class id");

    let o = run(&["explain", "--neuron", "99"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("99") && e.contains("0..=31"),
        "{e}"
    );

    let o = run(&["explain", "--preset", "sd3", "--class", "1"]);
    let e = stderr(&o);
    assert!(
        !o.status.success()
            && e.contains("sd3")
            && e.contains("sd15-lcm")
            && e.contains("sd-turbo"),
        "{e}"
    );

    let o = run(&["explain", "--preset", "sd15-lcm", "--class", "1"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("--classifier") && e.contains("vit-b16"),
        "{e}"
    );

    let o = run(&[
        "explain",
        "--preset",
        "sd-turbo",
        "--classifier",
        "resnet50",
        "--classifier-checkpoint",
        "/no/such/resnet50.pth",
        "--class",
        "1",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("/no/such/resnet50.pth"),
        "{e}"
    );

    let o = run(&[
        "explain",
        "--model-dir",
        "/no/such/model",
        "--classifier",
        "robust-resnet50",
        "--classifier-checkpoint",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        "--class",
        "1",
    ]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("/no/such/model"), "{e}");

    let o = run(&[
        "explain",
        "--preset",
        "sd-turbo",
        "--classifier",
        "robust-resnet50",
        "--classifier-checkpoint",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("--class"), "{e}");

    let o = run(&["explain", "--class", "1", "--dtype", "f8"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("f8"), "{e}");

    let o = run(&["show", "/no/such/record"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("/no/such/record"), "{e}");

    let o = run(&["tokens", "/no/such/prompt.safetensors"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("/no/such/prompt.safetensors"),
        "{e}"
    );
}

fn refused(args: &[&str], says: &[&str]) {
    let o = run(args);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} was accepted: {e}");
    for s in says {
        assert!(e.contains(s), "{args:?}: `{s}` not in: {e}");
    }
}

#[test]
fn options_without_effect_are_refused_before_anything_is_written() {
    let out = temp_dir("noeffect");
    let o = out.to_str().unwrap();
    refused(
        &[
            "explain",
            "--lora",
            "/does/not/exist.safetensors",
            "--out",
            o,
        ],
        &["--lora", "/does/not/exist.safetensors", "no effect", "tiny"],
    );
    refused(
        &[
            "explain",
            "--preset",
            "tiny",
            "--model-dir",
            "/nonexistent",
            "--out",
            o,
        ],
        &["--model-dir", "/nonexistent", "no effect"],
    );
    refused(
        &[
            "explain",
            "--preset",
            "tiny",
            "--hub",
            "org/model",
            "--out",
            o,
        ],
        &["--hub", "no effect"],
    );
    refused(
        &[
            "explain",
            "--model-dir",
            "/nonexistent",
            "--tiny-seed",
            "3",
            "--out",
            o,
        ],
        &["--tiny-seed", "no effect"],
    );
    refused(
        &["explain", "--lora-scale", "0.5", "--out", o],
        &["--lora-scale", "no effect"],
    );
    refused(
        &[
            "explain",
            "--model-dir",
            "/nonexistent",
            "--lora",
            "x.safetensors",
            "--lora-scale",
            "NaN",
            "--out",
            o,
        ],
        &["--lora-scale NaN", "finite"],
    );
    refused(
        &["explain", "--classifier-checkpoint", "x.pth", "--out", o],
        &["--classifier"],
    );
    refused(
        &["show", "/no/such/record", "--device", "cpu"],
        &["--reproduce"],
    );
    refused(
        &["tokens", "/tmp/x.safetensors", "--classifier", "resnet18"],
        &["--classifier"],
    );
    for (args, says) in [
        (
            &["--iterations", "0"][..],
            "--iterations must be at least 1",
        ),
        (&["--top", "0"][..], "--top must be at least 1"),
        (
            &["--class", "1", "--early-stop", "0"][..],
            "--early-stop must be at least 1",
        ),
        (&["--lr=-1"][..], "--lr must be a positive"),
        (&["--guidance", "0"][..], "--guidance 0"),
        (&["--guidance", "1"][..], "only above 1"),
        (
            &["--neuron", "2", "--early-stop", "3"][..],
            "--early-stop counts iterations",
        ),
        (
            &["--features", "1,2", "--early-stop", "3"][..],
            "--early-stop counts iterations",
        ),
        (
            &["--neuron", "2", "--log-probability"][..],
            "--log-probability applies to --class",
        ),
        (&["--dtype", "bf16"][..], "--dtype bf16 needs a GPU"),
        // A file given as a folder (or a folder as a file) is named as such, not "not found".
        (
            &["--model-dir", "Cargo.toml"][..],
            "is a file, not a folder",
        ),
        (
            &["--model-dir", ".", "--lora", "."][..],
            "is a folder, not a file",
        ),
    ] {
        let mut all = vec!["explain"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--out", o]);
        refused(&all, &[says]);
    }
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

#[test]
fn tokens_of_a_record_refuses_model_options_and_of_a_prompt_needs_no_classifier() {
    let out = temp_dir("tokens");
    let o = run(&[
        "explain",
        "--iterations",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    refused(
        &["tokens", out.to_str().unwrap(), "--preset", "tiny"],
        &["run record", "--preset", "no effect"],
    );
    // A prompt file with the folder it was made for: no --classifier is needed.
    let folder = temp_dir("tokens-folder");
    diffexplainer::explain::bundle::write_tiny_diffusers_folder(0, &folder).unwrap();
    let prompt = out.join("prompt.safetensors");
    let o = run(&[
        "tokens",
        prompt.to_str().unwrap(),
        "--model-dir",
        folder.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_folder: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let o = run(&["tokens", out.to_str().unwrap(), "--json"]);
    let from_record: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        from_folder, from_record,
        "the folder is the same tiny model"
    );
}

#[test]
fn sizes_are_checked_before_any_record_and_odd_latents_run() {
    let out = temp_dir("size");
    refused(
        &[
            "explain",
            "--resolution",
            "34",
            "--out",
            out.to_str().unwrap(),
        ],
        &["resolution 34", "scale factor 4", "32 or 36"],
    );
    assert!(!out.exists());
    // 36 px: 9x9 latents, not a multiple of the tiny UNet's 2 (diffusers runs it).
    let o = run(&[
        "explain",
        "--resolution",
        "36",
        "--iterations",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("summary.json").is_file());
}

#[test]
fn ddim_runs_on_the_embedded_default() {
    let out = temp_dir("ddim");
    let o = run(&[
        "explain",
        "--scheduler",
        "ddim",
        "--iterations",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn default_record_folders_never_collide() {
    let cwd = temp_dir("collide");
    std::fs::create_dir_all(&cwd).unwrap();
    let spawn = || {
        bin()
            .current_dir(&cwd)
            .args(["explain", "--iterations", "1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let mut records: Vec<String> = std::fs::read_dir(cwd.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    records.sort();
    assert_eq!(records.len(), 2, "{records:?}");
    for r in &records {
        assert!(
            cwd.join("runs").join(r).join("summary.json").is_file(),
            "{r}"
        );
    }
}

#[test]
fn a_user_mistake_prints_no_backtrace_even_with_rust_backtrace() {
    // A classifier checkpoint that is not one: the error comes from deep in the loader.
    let o = bin()
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .args([
            "explain",
            "--classifier",
            "resnet18",
            "--classifier-checkpoint",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            "--class",
            "1",
        ])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("Cargo.toml") && e.contains("not a checkpoint format"),
        "{e}"
    );
    assert!(
        !e.contains("backtrace") && !e.contains("Backtrace") && e.lines().count() <= 3,
        "{e}"
    );
}
