//! Spurious-feature tables on hand-made rows and evidence: the notebook rendering (HTML with
//! MIME-ready PNG thumbnails, text fallback), CSV and JSON round trips, saved folders read
//! back, and bad input.

use candle_core::{Device, Tensor};
use diffexplainer::spurious::labelling::label_maps;
use diffexplainer::spurious::table::{rows_from_csv, ClassTable, Evidence, LabelRow};
use diffexplainer::spurious::{LabelRule, Verdict};

fn row(feature: usize, rank: usize, label: Verdict, shares: Vec<Option<f64>>) -> LabelRow {
    LabelRow {
        class_index: 2,
        class_name: "red \"fox\", <b>".into(),
        feature,
        rank,
        label,
        score: Some(0.1 + 0.7 * (rank as f64) / 3.0),
        margin: (label != Verdict::Uncertain).then_some(0.062_5),
        share_threshold: Some(0.4),
        images: shares.len(),
        active_images: shares.iter().flatten().count(),
        shares,
        objective: 1.0 / 3.0,
        prompt: "A texture of fox".into(),
        nearest_tokens: "v0: fox (0.41), wolf (0.39); v1: snow, (0.2)".into(),
    }
}

/// Two 8x8 images: map in the left half; mask the left half (image 0) or all (image 1).
fn evidence() -> Evidence {
    let dev = Device::Cpu;
    let left: Vec<f32> = (0..64).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect();
    let maps = Tensor::from_vec([left.clone(), left.clone()].concat(), (2, 8, 8), &dev).unwrap();
    let masks = Tensor::from_vec([left, vec![1.0; 64]].concat(), (2, 8, 8), &dev).unwrap();
    let images = Tensor::arange(0f32, 384.0, &dev)
        .unwrap()
        .affine(1.0 / 384.0, 0.0)
        .unwrap()
        .reshape((2, 3, 8, 8))
        .unwrap();
    Evidence {
        images,
        masks,
        maps,
    }
}

fn table() -> ClassTable {
    let ev = evidence();
    let summary = label_maps(&ev.maps, &ev.masks, &LabelRule::default()).unwrap();
    let mut first = row(11, 1, summary.label, summary.shares.clone());
    first.score = summary.score;
    first.margin = summary.margin;
    ClassTable {
        class_index: 2,
        class_name: "red \"fox\", <b>".into(),
        query: "a photo of a red \"fox\", <b>".into(),
        rule: LabelRule::default(),
        rows: vec![
            first,
            row(5, 2, Verdict::Spurious, vec![Some(0.1), None, Some(0.25)]),
            row(40, 3, Verdict::Uncertain, vec![]),
        ],
        evidence: vec![Some(ev), None, None],
    }
}

#[test]
fn renders_html_with_png_thumbnails_and_a_text_fallback() {
    let t = table();
    assert_eq!(t.rows[0].label, Verdict::Core, "the hand-made row is core");
    let d = t.display().unwrap();
    let html = d.get("text/html").unwrap();
    // Images, overlays and heatmaps of both images of the row with evidence, as data URIs.
    let thumbs = html
        .matches("src=\"data:image/png;base64,iVBORw0KGgo")
        .count();
    assert_eq!(thumbs, 3 * 2, "{html}");
    assert!(html.contains("<b>core</b>") && html.contains("<b>spurious</b>"));
    assert!(html.contains("<b>uncertain</b>"));
    assert!(html.contains("±0.06") && html.contains("2/3"), "{html}");
    // Names are escaped.
    assert!(html.contains("red &quot;fox&quot;, &lt;b&gt;") && !html.contains("<b>\""));
    let text = d.get("text/plain").unwrap();
    assert_eq!(text.lines().count(), 2 + 3, "{text}");
    assert!(text.contains("spurious") && text.contains("0.06"));
    // Each thumbnail decodes to the image's size.
    let start = html.find("base64,").unwrap() + 7;
    let end = start + html[start..].find('"').unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(&html[start..end])
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (8, 8));
}

#[test]
fn csv_and_json_round_trip_the_rows() {
    let t = table();
    let csv = t.to_csv().unwrap();
    assert!(csv.starts_with("class_index,class_name,feature,rank,label,score,margin,"));
    assert_eq!(rows_from_csv(&csv).unwrap(), t.rows);
    // Shares and missing values as written.
    assert!(csv.contains(",0.1;-;0.25,"), "{csv}");
    let back = ClassTable::from_json(&t.to_json().unwrap()).unwrap();
    assert_eq!(back.rows, t.rows);
    assert_eq!(
        (back.class_index, back.query, back.rule),
        (t.class_index, t.query.clone(), t.rule)
    );
    assert!(back.evidence.iter().all(Option::is_none));
}

#[test]
fn a_saved_folder_reads_back_with_its_evidence() {
    let dir = std::env::temp_dir().join(format!("spurious-table-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = table();
    t.save(&dir).unwrap();
    for f in [
        "labels.json",
        "labels.csv",
        "table.html",
        "feature11/image_1.png",
        "feature11/mask_0.png",
        "feature11/overlay_1.png",
        "feature11/heatmap_0.png",
        "feature11/activation_1.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert!(!dir.join("feature5").exists(), "no evidence, no folder");
    let html = std::fs::read_to_string(dir.join("table.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("data:image/png;base64,"));
    let back = ClassTable::load(&dir).unwrap();
    assert_eq!(back.rows, t.rows);
    let ev = back.evidence[0].as_ref().expect("evidence read back");
    assert!(back.evidence[1].is_none());
    // 0/1 masks and maps survive 8-bit PNGs exactly, so the shares do too.
    let again = label_maps(&ev.maps, &ev.masks, &back.rule).unwrap();
    assert_eq!(again.shares, t.rows[0].shares);
    let orig = &t.evidence[0].as_ref().unwrap().images;
    let diff = (&ev.images - orig)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 0.5 / 255.0 + 1e-6, "images differ by {diff}");
    // A second save into the same folder is refused before writing.
    let err = t.save(&dir).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_csv_and_json_are_errors_naming_the_problem() {
    let t = table();
    let csv = t.to_csv().unwrap();
    // Drop the `label` column.
    let dropped: String = csv
        .lines()
        .map(|l| {
            let mut r = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(l.as_bytes());
            let rec = r.records().next().unwrap().unwrap();
            let mut w = csv::Writer::from_writer(Vec::new());
            let fields: Vec<&str> = rec
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 4)
                .map(|(_, f)| f)
                .collect();
            w.write_record(&fields).unwrap();
            String::from_utf8(w.into_inner().unwrap()).unwrap()
        })
        .collect();
    let err = format!("{:#}", rows_from_csv(&dropped).unwrap_err());
    assert!(err.contains("line 2") && err.contains("label"), "{err}");
    let bad_share = csv.replacen(",0.1;-;0.25,", ",0.1;x;0.25,", 1);
    let err = format!("{:#}", rows_from_csv(&bad_share).unwrap_err());
    assert!(err.contains("line 3") && err.contains("\"x\""), "{err}");
    let bad_label = csv.replacen(",spurious,", ",maybe,", 1);
    let err = format!("{:#}", rows_from_csv(&bad_label).unwrap_err());
    assert!(err.contains("line 3") && err.contains("maybe"), "{err}");
    assert!(ClassTable::from_json("{\"rows\": []}").is_err());
}
