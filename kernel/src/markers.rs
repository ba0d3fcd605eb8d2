//! Turns the evaluation process's stdout lines into outputs: plain text, display blocks (see
//! `diffexplainer::display` for the format) and panic reports.
//!
//! evcxr consumes its own `EVCXR_BEGIN_CONTENT` blocks (they become the cell's result); every
//! other stdout line reaches us as it is printed, so display blocks render while the cell runs.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text for the `stdout` stream (lines joined, each ending in '\n').
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

#[derive(Default)]
pub struct MarkerParser {
    block: Option<Block>,
}

struct Block {
    display_id: Option<String>,
    update: bool,
    data: Map<String, Value>,
    content: Option<(String, Vec<String>)>,
    /// Raw lines, replayed as text if the block turns out malformed.
    raw: Vec<String>,
}

const BEGIN_DISPLAY: &str = "DIFFEXPLAINER_BEGIN_DISPLAY";
const END_DISPLAY: &str = "DIFFEXPLAINER_END_DISPLAY";
const BEGIN_CONTENT: &str = "DIFFEXPLAINER_BEGIN_CONTENT ";
const END_CONTENT: &str = "DIFFEXPLAINER_END_CONTENT";
const PANIC: &str = "DIFFEXPLAINER_PANIC ";

impl MarkerParser {
    /// Feeds one line (without its newline); appends the resulting events.
    pub fn line(&mut self, line: &str, out: &mut Vec<Event>) {
        if let Some(block) = &mut self.block {
            block.raw.push(line.to_string());
            if let Some((_, lines)) = &mut block.content {
                if line == END_CONTENT {
                    let (mime, lines) = block.content.take().unwrap();
                    let text = lines.join("\n");
                    let value = if mime.ends_with("json") {
                        serde_json::from_str(&text).unwrap_or(Value::String(text))
                    } else {
                        Value::String(text)
                    };
                    block.data.insert(mime, value);
                } else {
                    lines.push(line.to_string());
                }
                return;
            }
            if let Some(mime) = line.strip_prefix(BEGIN_CONTENT) {
                block.content = Some((mime.trim().to_string(), Vec::new()));
            } else if line == END_DISPLAY {
                let block = self.block.take().unwrap();
                out.push(Event::Display {
                    data: block.data,
                    display_id: block.display_id,
                    update: block.update,
                });
            } else {
                // Malformed block: give the raw lines back as text rather than losing them.
                let block = self.block.take().unwrap();
                push_text(out, &block.raw.join("\n"));
            }
            return;
        }
        if let Some(rest) = line.strip_prefix(BEGIN_DISPLAY) {
            let header: Value = serde_json::from_str(rest.trim()).unwrap_or(Value::Null);
            self.block = Some(Block {
                display_id: header["display_id"].as_str().map(str::to_string),
                update: header["update"].as_bool().unwrap_or(false),
                data: Map::new(),
                content: None,
                raw: vec![line.to_string()],
            });
        } else if let Some(rest) = line.strip_prefix(PANIC) {
            let v: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
            out.push(Event::Panic {
                message: v["message"].as_str().unwrap_or(rest).to_string(),
                location: v["location"].as_str().unwrap_or("").to_string(),
            });
        } else {
            push_text(out, line);
        }
    }

    /// End of a cell: an unterminated block is returned as text.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if let Some(block) = self.block.take() {
            push_text(out, &block.raw.join("\n"));
        }
    }
}

fn push_text(out: &mut Vec<Event>, line: &str) {
    if let Some(Event::Text(t)) = out.last_mut() {
        t.push_str(line);
        t.push('\n');
    } else {
        out.push(Event::Text(format!("{line}\n")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str]) -> Vec<Event> {
        let mut p = MarkerParser::default();
        let mut out = Vec::new();
        for l in lines {
            p.line(l, &mut out);
        }
        p.finish(&mut out);
        out
    }

    #[test]
    fn text_display_and_update() {
        let ev = parse(&[
            "hello",
            "world",
            r#"DIFFEXPLAINER_BEGIN_DISPLAY {"display_id":"p1","update":true}"#,
            "DIFFEXPLAINER_BEGIN_CONTENT text/plain",
            "a",
            "b",
            "DIFFEXPLAINER_END_CONTENT",
            "DIFFEXPLAINER_BEGIN_CONTENT image/png",
            "iVBOR",
            "DIFFEXPLAINER_END_CONTENT",
            "DIFFEXPLAINER_END_DISPLAY",
            "after",
        ]);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0], Event::Text("hello\nworld\n".into()));
        match &ev[1] {
            Event::Display {
                data,
                display_id,
                update,
            } => {
                assert_eq!(data["text/plain"], "a\nb");
                assert_eq!(data["image/png"], "iVBOR");
                assert_eq!(display_id.as_deref(), Some("p1"));
                assert!(*update);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ev[2], Event::Text("after\n".into()));
    }

    #[test]
    fn malformed_and_unterminated_blocks_become_text() {
        let ev = parse(&["DIFFEXPLAINER_BEGIN_DISPLAY {}", "junk"]);
        assert_eq!(
            ev,
            vec![Event::Text("DIFFEXPLAINER_BEGIN_DISPLAY {}\njunk\n".into())]
        );
        let ev = parse(&[
            "DIFFEXPLAINER_BEGIN_DISPLAY {}",
            "DIFFEXPLAINER_BEGIN_CONTENT text/plain",
            "x",
        ]);
        assert!(matches!(&ev[0], Event::Text(t) if t.ends_with("x\n")));
    }

    #[test]
    fn panic_marker() {
        let ev = parse(&[r#"DIFFEXPLAINER_PANIC {"message":"boom","location":"src/lib.rs:1:2"}"#]);
        assert_eq!(
            ev,
            vec![Event::Panic {
                message: "boom".into(),
                location: "src/lib.rs:1:2".into()
            }]
        );
    }

    #[test]
    fn library_block_format_roundtrips() {
        // The exact text diffexplainer::display::display_block produces.
        let d = diffexplainer::display::Display::new()
            .text("t")
            .html("<i>h</i>");
        let block = diffexplainer::display::display_block(&d, Some("x"), false);
        let lines: Vec<&str> = block.lines().collect();
        match &parse(&lines)[0] {
            Event::Display {
                data,
                display_id,
                update,
            } => {
                assert_eq!(data["text/html"], "<i>h</i>");
                assert_eq!(display_id.as_deref(), Some("x"));
                assert!(!update);
            }
            other => panic!("{other:?}"),
        }
    }
}
