//! The Salient ImageNet MTurk reader and the agreement metrics, on a synthetic file in the
//! published format (`tests/fixtures/salient_imagenet/synthetic_mturk.csv`, written by hand:
//! 8 pairs, 2 of them with 4 and 6 answers, quoted reasons with commas and a line break, rows of
//! one class out of rank order).

use std::path::{Path, PathBuf};

use diffexplainer::spurious::salient_imagenet::{agreement, Answer, Label, SalientImagenet};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/salient_imagenet/synthetic_mturk.csv")
}

const HEADER: &str = "WorkerId,Input.wordnet_id,Input.class_index,Input.feature_index,Input.feature_rank,Answer.main,Answer.confidence,Answer.reasons\n";

#[test]
fn reads_pairs_labels_and_ranks() {
    let data = SalientImagenet::from_path(fixture()).unwrap();
    let labels: Vec<(usize, usize, usize, usize, Label)> = data
        .pairs
        .iter()
        .map(|p| {
            (
                p.class_index,
                p.feature_index,
                p.feature_rank,
                p.spurious_votes,
                p.label,
            )
        })
        .collect();
    assert_eq!(
        labels,
        vec![
            (0, 59, 1, 0, Label::Core),
            (0, 1696, 2, 2, Label::Core),     // 2 of 5: not a majority
            (0, 981, 3, 3, Label::Spurious),  // 3 of 5: the threshold
            (2, 1697, 1, 4, Label::Spurious), // separate_object and background both count
            (5, 564, 1, 5, Label::Spurious),
            (5, 310, 2, 1, Label::Core),
        ]
    );
    assert_eq!(
        data.class_features(5),
        vec![564, 310],
        "by rank, not file order"
    );
    assert_eq!(data.class_features(0), vec![59, 1696, 981]);
    assert_eq!(
        data.classes().keys().copied().collect::<Vec<_>>(),
        vec![0, 2, 5]
    );
    let shark = &data.pairs[3];
    assert_eq!(shark.wordnet_id, "n01484850");
    assert_eq!(shark.answers[1].answer, Answer::Background);
    assert_eq!(shark.answers[1].reasons, "open water,\nno shark");
    assert_eq!(shark.answers[0].answer, Answer::SeparateObject);
    assert_eq!(shark.answers[0].confidence, 4.0);
}

#[test]
fn pairs_without_five_answers_are_reported_skips() {
    let data = SalientImagenet::from_path(fixture()).unwrap();
    let skipped: Vec<(usize, usize, usize)> = data
        .skipped
        .iter()
        .map(|s| (s.class_index, s.feature_index, s.lines.len()))
        .collect();
    assert_eq!(skipped, vec![(2, 227, 6), (2, 686, 4)]);
    let four = &data.skipped[1];
    assert!(
        four.reason.contains("4 answers instead of 5"),
        "{}",
        four.reason
    );
    // Lines are the file's (header = 1; the quoted reason spans lines 18-19, so the shark's
    // first pair ends on line 22).
    assert_eq!(four.lines, vec![23, 24, 25, 26]);
    assert!(data.label(2, 686).is_none());
}

#[test]
fn agreement_reports_the_confusion_matrix_and_balanced_scores() {
    let data = SalientImagenet::from_path(fixture()).unwrap();
    // Reference: spurious (0,981) (2,1697) (5,564); core (0,59) (0,1696) (5,310).
    let ours = [
        ((0, 59), Label::Core),       // TN
        ((0, 1696), Label::Spurious), // FP
        ((0, 981), Label::Spurious),  // TP
        ((2, 1697), Label::Core),     // FN
        ((5, 564), Label::Spurious),  // TP
        ((2, 686), Label::Spurious),  // skipped in the reference: not counted
    ];
    let a = agreement(&data, &ours).unwrap();
    let c = a.confusion;
    assert_eq!(
        (
            c.spurious_as_spurious,
            c.spurious_as_core,
            c.core_as_spurious,
            c.core_as_core
        ),
        (2, 1, 1, 1)
    );
    let close = |x: Option<f64>, want: f64| (x.unwrap() - want).abs() < 1e-12;
    assert!(close(a.spurious_precision, 2.0 / 3.0));
    assert!(close(a.spurious_recall, 2.0 / 3.0));
    assert!(close(a.spurious_f1, 2.0 / 3.0));
    // Recall on spurious 2/3, on core 1/2.
    assert!(close(a.balanced_accuracy, (2.0 / 3.0 + 0.5) / 2.0));
    assert_eq!(a.not_in_reference, vec![(2, 686)]);
    assert_eq!(a.unlabelled, 1); // (5, 310)

    // "Always core" gets no spurious precision and a balanced accuracy of one half.
    let always_core: Vec<_> = data
        .pairs
        .iter()
        .map(|p| ((p.class_index, p.feature_index), Label::Core))
        .collect();
    let a = agreement(&data, &always_core).unwrap();
    assert_eq!(a.spurious_precision, None);
    assert_eq!(a.spurious_recall, Some(0.0));
    assert_eq!(a.balanced_accuracy, Some(0.5));

    let twice = [((0, 59), Label::Core), ((0, 59), Label::Spurious)];
    let err = agreement(&data, &twice).unwrap_err().to_string();
    assert!(err.contains("class 0, feature 59"), "{err}");
}

#[test]
fn missing_columns_are_named() {
    let csv = "WorkerId,Input.class_index,Input.feature_index,Answer.main\n1,0,5,background\n";
    let err = format!(
        "{:#}",
        SalientImagenet::from_reader(csv.as_bytes()).unwrap_err()
    );
    for col in [
        "Input.wordnet_id",
        "Input.feature_rank",
        "Answer.confidence",
        "Answer.reasons",
    ] {
        assert!(err.contains(col), "{err}");
    }
    let missing = err.split("(the header has").next().unwrap();
    assert!(
        !missing.contains("Input.class_index"),
        "lists only the missing ones: {err}"
    );
}

#[test]
fn unknown_answers_and_bad_numbers_name_the_line() {
    let csv = format!("{HEADER}1,n0,0,5,1,main_object,4.0,ok\n2,n0,0,5,1,on_the_object,4.0,typo\n");
    let err = format!(
        "{:#}",
        SalientImagenet::from_reader(csv.as_bytes()).unwrap_err()
    );
    assert!(
        err.contains("line 3") && err.contains("on_the_object"),
        "{err}"
    );
    let csv = format!("{HEADER}1,n0,zero,5,1,main_object,4.0,ok\n");
    let err = format!(
        "{:#}",
        SalientImagenet::from_reader(csv.as_bytes()).unwrap_err()
    );
    assert!(
        err.contains("line 2") && err.contains("Input.class_index"),
        "{err}"
    );
    let csv = format!("{HEADER}1,n0,0,5,1,main_object,high,ok\n");
    let err = format!(
        "{:#}",
        SalientImagenet::from_reader(csv.as_bytes()).unwrap_err()
    );
    assert!(
        err.contains("line 2") && err.contains("Answer.confidence"),
        "{err}"
    );
}

#[test]
fn rows_of_a_pair_that_disagree_are_an_error() {
    let mut csv = HEADER.to_string();
    for (i, rank) in [1, 1, 1, 2, 1].iter().enumerate() {
        csv.push_str(&format!("{i},n0,0,5,{rank},main_object,4.0,ok\n"));
    }
    let err = format!(
        "{:#}",
        SalientImagenet::from_reader(csv.as_bytes()).unwrap_err()
    );
    assert!(
        err.contains("class 0, feature 5") && err.contains("line 5"),
        "{err}"
    );
}
