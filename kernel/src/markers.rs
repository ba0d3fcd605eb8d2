//! Turns the evaluation process's stdout pieces into outputs: text, display frames and panic
//! reports (see `diffexplainer::display` for the library side).
//!
//! The vendored evcxr (`vendor/evcxr/src/framing.rs`) reads stdout as bytes and delivers text as
//! soon as it is read; a control frame (`FRAME_GUARD`, a kind, one line) that evcxr does not
//! handle itself arrives as one piece of its own, exactly as printed. Frames are recognised
//! anywhere in the output, so `print!("x"); show(&image)` still shows the image.

use serde_json::{Map, Value};

/// The guard that starts every control frame (shared with the vendored evcxr and the library).
pub const FRAME_GUARD: &str = "\u{1e}EVCXR\u{1f}";

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text for the `stdout` stream, as printed.
    Text(String),
    /// A `display_data`, or an `update_display_data` when `update` is true.
    Display {
        data: Map<String, Value>,
        display_id: Option<String>,
        update: bool,
    },
    /// A panic in the cell (from the panic hook the kernel installs).
    Panic { message: String, location: String },
}

const DISPLAY: &str = "DIFFEXPLAINER_DISPLAY ";
const PANIC: &str = "DIFFEXPLAINER_PANIC ";

/// Classifies one piece of stdout. A frame that is not ours, or whose JSON does not parse, is
/// given back as the text that was printed.
pub fn parse_piece(piece: String) -> Event {
    let Some(frame) = piece.strip_prefix(FRAME_GUARD) else {
        return Event::Text(piece);
    };
    let line = frame.trim_end_matches('\n');
    if let Some(json) = line.strip_prefix(DISPLAY) {
        if let Ok(Value::Object(mut v)) = serde_json::from_str::<Value>(json) {
            let data = match v.remove("data") {
                Some(Value::Object(data)) => data,
                _ => Map::new(),
            };
            let data = data
                .into_iter()
                .map(|(mime, content)| {
                    // JSON MIME types carry a JSON document as text.
                    let content = match (mime.ends_with("json"), content) {
                        (true, Value::String(s)) => {
                            serde_json::from_str(&s).unwrap_or(Value::String(s))
                        }
                        (_, c) => c,
                    };
                    (mime, content)
                })
                .collect();
            return Event::Display {
                data,
                display_id: v
                    .get("display_id")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                update: v.get("update").and_then(Value::as_bool).unwrap_or(false),
            };
        }
    } else if let Some(json) = line.strip_prefix(PANIC) {
        if let Ok(v) = serde_json::from_str::<Value>(json) {
            return Event::Panic {
                message: v["message"].as_str().unwrap_or("").to_string(),
                location: v["location"].as_str().unwrap_or("").to_string(),
            };
        }
    }
    Event::Text(piece)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_display_update_and_panic() {
        assert_eq!(parse_piece("hello\n".into()), Event::Text("hello\n".into()));
        let frame = format!(
            "{FRAME_GUARD}DIFFEXPLAINER_DISPLAY {{\"display_id\":\"p1\",\"update\":true,\"data\":{{\"text/plain\":\"a\\nb\",\"image/png\":\"iVBOR\"}}}}\n"
        );
        match parse_piece(frame) {
            Event::Display {
                data,
                display_id,
                update,
            } => {
                assert_eq!(data["text/plain"], "a\nb");
                assert_eq!(data["image/png"], "iVBOR");
                assert_eq!(display_id.as_deref(), Some("p1"));
                assert!(update);
            }
            other => panic!("{other:?}"),
        }
        let panic = format!(
            "{FRAME_GUARD}DIFFEXPLAINER_PANIC {{\"message\":\"boom\",\"location\":\"src/lib.rs:1:2\"}}\n"
        );
        assert_eq!(
            parse_piece(panic),
            Event::Panic {
                message: "boom".into(),
                location: "src/lib.rs:1:2".into()
            }
        );
    }

    #[test]
    fn unknown_and_malformed_frames_are_text() {
        let other = format!("{FRAME_GUARD}SOMETHING_ELSE 1\n");
        assert_eq!(parse_piece(other.clone()), Event::Text(other));
        let bad = format!("{FRAME_GUARD}DIFFEXPLAINER_DISPLAY {{not json\n");
        assert_eq!(parse_piece(bad.clone()), Event::Text(bad));
    }

    #[test]
    fn library_frame_format_roundtrips() {
        // The exact text diffexplainer::display::display_block produces.
        assert_eq!(diffexplainer::display::FRAME_GUARD, FRAME_GUARD);
        let d = diffexplainer::display::Display::new()
            .text("t\nu")
            .html("<i>h</i>");
        let block = diffexplainer::display::display_block(&d, Some("x"), false);
        match parse_piece(block) {
            Event::Display {
                data,
                display_id,
                update,
            } => {
                assert_eq!(data["text/html"], "<i>h</i>");
                assert_eq!(data["text/plain"], "t\nu");
                assert_eq!(display_id.as_deref(), Some("x"));
                assert!(!update);
            }
            other => panic!("{other:?}"),
        }
    }
}
