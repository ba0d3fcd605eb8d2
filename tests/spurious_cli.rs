//! `diffexplainer spurious label|agreement`: a labelling run on the embedded tiny diffusion
//! models, the committed ShapesWorld ResNet and a tiny random CLIPSeg writes a table folder;
//! agreement with the synthetic Salient ImageNet CSV gives the hand-computed metrics; bad input
//! fails before anything is written, naming the problem.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffexplainer::spurious::{ClassTable, LabelRow, LabelRule, Verdict};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffexplainer"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dx-spurious-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn classifier() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/world/classifier")
        .display()
        .to_string()
}

fn synthetic_csv() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/salient_imagenet/synthetic_mturk.csv")
        .display()
        .to_string()
}

#[test]
fn label_writes_a_table_folder() {
    let out = temp_dir("label");
    let o = run(&[
        "spurious",
        "label",
        "--classifier",
        &classifier(),
        "--segmenter",
        "tiny",
        "--class",
        "2",
        "--features",
        "3,7",
        "--images",
        "2",
        "--iterations",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    // The class name comes from the classifier folder.
    assert!(
        stderr.contains("query \"a photo of a triangle\""),
        "{stderr}"
    );
    assert!(stdout.contains("written to"), "{stdout}");
    let table = ClassTable::load(&out).unwrap();
    assert_eq!(
        table.rows.iter().map(|r| r.feature).collect::<Vec<_>>(),
        vec![3, 7]
    );
    assert!(table.rows.iter().all(|r| r.images == 2));
    assert!(table.evidence.iter().all(Option::is_some));
    assert!(out.join("feature7/heatmap_1.png").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn top_k_features_come_from_the_world_images() {
    let out = temp_dir("topk");
    let o = run(&[
        "spurious",
        "label",
        "--classifier",
        &classifier(),
        "--segmenter",
        "tiny",
        "--class",
        "0",
        "--top-k",
        "2",
        "--images-per-class",
        "4",
        "--images",
        "2",
        "--iterations",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("top-2 features of class 0"), "{stderr}");
    let table = ClassTable::from_json(&stdout).unwrap();
    assert_eq!(table.rows.len(), 2);
    assert_eq!(table.class_name, "circle");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_label_input_fails_before_writing() {
    let out = temp_dir("bad");
    let base = |extra: &[&str]| -> Output {
        let mut args = vec![
            "spurious",
            "label",
            "--segmenter",
            "tiny",
            "--images",
            "2",
            "--iterations",
            "1",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        run(&args)
    };
    let c = classifier();
    let salient = synthetic_csv();
    // The default world with two classes swapped: the classifier's class 3 would be measured
    // on another class's images.
    let swapped = temp_dir("swapped.toml");
    let spec = diffexplainer::world::spec::DEFAULT_SPEC;
    let classes = r#"classes = ["circle", "square", "triangle", "star", "heart", "cross"]"#;
    assert!(
        spec.contains(classes),
        "the default spec's class line changed"
    );
    std::fs::write(
        &swapped,
        spec.replace(
            classes,
            r#"classes = ["circle", "square", "triangle", "heart", "star", "cross"]"#,
        ),
    )
    .unwrap();
    let swapped_path = swapped.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "--classifier",
                &c,
                "--class",
                "3",
                "--top-k",
                "2",
                "--world",
                &swapped_path,
            ],
            vec!["are not the world's", "--world"],
        ),
        (
            vec![
                "--classifier",
                &c,
                "--class",
                "1",
                "--features",
                "3",
                "--images-per-class",
                "5",
            ],
            vec!["--images-per-class has no effect without --top-k"],
        ),
        (
            vec!["--classifier", &c, "--class", "1", "--features", "3,99"],
            vec!["feature 99", "32 penultimate"],
        ),
        (
            vec!["--classifier", &c, "--class", "9", "--features", "3"],
            vec!["class id 9", "6 classes"],
        ),
        // The synthetic CSV's features (59, 1696, 981) are a ResNet-50's, not this ResNet's.
        (
            vec![
                "--classifier",
                &c,
                "--class",
                "0",
                "--salient-csv",
                &salient,
            ],
            vec!["feature 59"],
        ),
        // Class 2's pair (2, 686) has 4 answers: reported as skipped, naming its lines.
        (
            vec![
                "--classifier",
                &c,
                "--class",
                "2",
                "--salient-csv",
                &salient,
            ],
            vec![
                "skipped: class 2, feature 686: 4 answers instead of 5 (lines [23, 24, 25, 26])",
                "feature 1697",
            ],
        ),
        (
            vec![
                "--classifier",
                &c,
                "--class",
                "4",
                "--salient-csv",
                &salient,
            ],
            vec!["no annotated", "class 4"],
        ),
        (
            vec![
                "--classifier",
                &c,
                "--class",
                "1",
                "--features",
                "3",
                "--query-template",
                "a photo",
            ],
            vec!["placeholder"],
        ),
        // The tiny default's ViT names no classes and has no activation maps.
        (
            vec!["--class", "1", "--features", "3"],
            vec!["--class-name"],
        ),
        (
            vec!["--class", "1", "--class-name", "dog", "--features", "3"],
            vec!["ResNet"],
        ),
        (
            vec![
                "--classifier",
                &c,
                "--class",
                "1",
                "--features",
                "3",
                "--confidence",
                "1.5",
            ],
            vec!["confidence"],
        ),
        (
            vec!["--classifier", &c, "--class", "1"],
            vec!["--features", "--salient-csv", "--top-k"],
        ),
    ];
    for (args, wanted) in cases {
        let o = base(&args);
        let (_, stderr) = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        for w in wanted {
            assert!(stderr.contains(w), "{args:?}: {w:?} not in {stderr}");
        }
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // A CSV with a missing column.
    let csv = temp_dir("csv.csv");
    std::fs::write(&csv, "WorkerId,Input.class_index\n1,0\n").unwrap();
    let o = base(&[
        "--classifier",
        &c,
        "--class",
        "0",
        "--salient-csv",
        csv.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&o);
    assert!(stderr.contains("Answer.main"), "{stderr}");
    assert!(!out.exists());
    std::fs::remove_file(&csv).unwrap();
}

fn row(class: usize, feature: usize, label: Verdict) -> LabelRow {
    LabelRow {
        class_index: class,
        class_name: format!("class {class}"),
        feature,
        rank: 1,
        label,
        score: None,
        margin: None,
        share_threshold: None,
        images: 0,
        active_images: 0,
        shares: vec![],
        objective: 0.0,
        prompt: String::new(),
        nearest_tokens: String::new(),
    }
}

fn save(dir: &Path, class: usize, rows: Vec<LabelRow>) {
    let n = rows.len();
    ClassTable {
        class_index: class,
        class_name: format!("class {class}"),
        query: String::new(),
        rule: LabelRule::default(),
        rows,
        evidence: vec![None; n],
    }
    .save(dir)
    .unwrap();
}

#[test]
fn agreement_reports_the_hand_computed_metrics() {
    let labels = temp_dir("agreement");
    save(
        &labels.join("class0"),
        0,
        vec![
            row(0, 59, Verdict::Core),
            row(0, 1696, Verdict::Spurious),
            row(0, 981, Verdict::Spurious),
        ],
    );
    save(
        &labels.join("class5"),
        5,
        vec![
            row(5, 564, Verdict::Spurious),
            row(5, 310, Verdict::Uncertain),
            row(5, 77, Verdict::Core),
        ],
    );
    let o = run(&[
        "spurious",
        "agreement",
        "--salient-csv",
        &synthetic_csv(),
        "--labels",
        labels.to_str().unwrap(),
        "--json",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // Reference spurious: (0,981), (2,1697), (5,564). Compared: (0,59) core/core,
    // (0,1696) core/spurious, (0,981) and (5,564) spurious/spurious. TP 2, FP 1, TN 1, FN 0.
    assert_eq!(v["pairs_compared"], 4);
    assert_eq!(v["confusion"]["spurious_as_spurious"], 2);
    assert_eq!(v["confusion"]["core_as_spurious"], 1);
    assert_eq!(v["confusion"]["core_as_core"], 1);
    assert_eq!(v["confusion"]["spurious_as_core"], 0);
    let f = |k: &str| v[k].as_f64().unwrap();
    assert!((f("balanced_accuracy") - 0.75).abs() < 1e-12);
    assert!((f("spurious_precision") - 2.0 / 3.0).abs() < 1e-12);
    assert!((f("spurious_recall") - 1.0).abs() < 1e-12);
    assert!((f("spurious_f1") - 0.8).abs() < 1e-12);
    assert_eq!(v["uncertain_left_out"], serde_json::json!([[5, 310]]));
    assert_eq!(v["not_in_reference"], serde_json::json!([[5, 77]]));
    assert_eq!(v["reference_pairs_unlabelled"], 2);
    let skipped = v["reference_pairs_skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2);
    let mut pairs: Vec<(u64, u64, usize)> = skipped
        .iter()
        .map(|p| {
            (
                p["class_index"].as_u64().unwrap(),
                p["feature_index"].as_u64().unwrap(),
                p["lines"].as_array().unwrap().len(),
            )
        })
        .collect();
    pairs.sort();
    // (2, 227) has 6 answers, (2, 686) has 4.
    assert_eq!(pairs, vec![(2, 227, 6), (2, 686, 4)]);

    // The text report: the confusion matrix and the four scores, never raw accuracy alone.
    let o = run(&[
        "spurious",
        "agreement",
        "--salient-csv",
        &synthetic_csv(),
        "--labels",
        labels.join("class0").to_str().unwrap(),
        labels.join("class5").to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    for w in [
        "balanced accuracy   0.750",
        "spurious precision  0.667",
        "spurious F1         0.800",
        "left out as uncertain: 1",
        "skipped by the reader: class 2, feature 686",
    ] {
        assert!(stdout.contains(w), "{w:?} not in {stdout}");
    }
    // A folder without tables.
    let empty = labels.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(&[
        "spurious",
        "agreement",
        "--salient-csv",
        &synthetic_csv(),
        "--labels",
        empty.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("no labels.json"), "{stderr}");
    std::fs::remove_dir_all(&labels).unwrap();
}

/// A CSV in the published format for the small ResNet: class 1's features 3 (rank 1, core by
/// 4 of 5), 9 (rank 2, 4 answers: skipped) and 12 (rank 3, spurious by 3 of 5).
fn small_csv(path: &Path) {
    let mut text = String::from("WorkerId,Input.wordnet_id,Input.class_index,Input.feature_index,Input.feature_rank,Answer.main,Answer.confidence,Answer.reasons\n");
    let answers: [(usize, usize, &[&str]); 3] = [
        (
            3,
            1,
            &[
                "main_object",
                "main_object",
                "background",
                "main_object",
                "main_object",
            ],
        ),
        (
            9,
            2,
            &["main_object", "main_object", "main_object", "main_object"],
        ),
        (
            12,
            3,
            &[
                "background",
                "separate_object",
                "main_object",
                "background",
                "main_object",
            ],
        ),
    ];
    for (feature, rank, list) in answers {
        for (w, a) in list.iter().enumerate() {
            text.push_str(&format!("W{w},n00000001,1,{feature},{rank},{a},4.0,why\n"));
        }
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn salient_csv_features_keep_their_ranks_and_score_end_to_end() {
    let dir = temp_dir("csv-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("mturk.csv");
    small_csv(&csv);
    let out = dir.join("labels");
    let o = run(&[
        "spurious",
        "label",
        "--classifier",
        &classifier(),
        "--segmenter",
        "tiny",
        "--class",
        "1",
        "--salient-csv",
        csv.to_str().unwrap(),
        "--images",
        "2",
        "--iterations",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped: class 1, feature 9: 4 answers"),
        "{stderr}"
    );
    let table = ClassTable::load(&out).unwrap();
    let pairs: Vec<(usize, usize)> = table.rows.iter().map(|r| (r.feature, r.rank)).collect();
    assert_eq!(
        pairs,
        vec![(3, 1), (12, 3)],
        "the CSV's ranks, a gap at the skipped pair"
    );

    let o = run(&[
        "spurious",
        "agreement",
        "--salient-csv",
        csv.to_str().unwrap(),
        "--labels",
        out.to_str().unwrap(),
        "--json",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // Whatever the random segmenter made of them: decided pairs are compared, the others listed.
    let decided = table
        .rows
        .iter()
        .filter(|r| r.label != Verdict::Uncertain)
        .count();
    assert_eq!(v["pairs_compared"], decided);
    assert_eq!(
        v["uncertain_left_out"].as_array().unwrap().len(),
        2 - decided
    );
    assert_eq!(v["reference_pairs_unlabelled"], 2 - decided);
    std::fs::remove_dir_all(&dir).unwrap();
}
