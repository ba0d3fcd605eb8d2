// Added in the diffexplainer vendored copy (see vendor/README.md).
//
// Byte-level framing of the evaluation process's stdout. Upstream evcxr read stdout with
// `BufRead::lines`, so a marker only counted at the start of a line (`print!("x")` followed by
// the end-of-execution marker hung the cell), and one invalid UTF-8 byte ended the reader early
// and left the marker for the next cell to find (every later cell's output shifted by one).
//
// Here control messages are *frames*: `FRAME_GUARD` (two ASCII control characters around
// "EVCXR", which text output does not contain by accident) followed by one line. A frame is
// recognised anywhere in the stream, not only at the start of a line. The unguarded markers that
// third-party code prints (`evcxr_display`'s `EVCXR_BEGIN_CONTENT` blocks and `evcxr_input`'s
// requests) are still recognised at the start of a line. Everything else is text, delivered as
// soon as it is read (partial lines included); invalid UTF-8 becomes U+FFFD.

pub(crate) use crate::evcxr_internal_runtime::FRAME_GUARD;

/// The guard as it is written inside generated Rust source (a string-literal escape).
pub(crate) const FRAME_GUARD_ESCAPED: &str = r"\u{1e}EVCXR\u{1f}";

/// Markers recognised (unguarded) at the start of a line, for compatibility with code that
/// prints evcxr's documented protocol itself.
const LINE_START_MARKERS: &[&str] = &[
    "EVCXR_BEGIN_CONTENT ",
    "EVCXR_END_CONTENT",
    evcxr_input::GET_CMD,
];

#[derive(Debug, PartialEq)]
pub(crate) enum Piece {
    /// Output text, as printed (newlines included).
    Text(String),
    /// A control line without its guard and newline; `guarded` says whether it was a frame.
    Control { line: String, guarded: bool },
}

#[derive(Default)]
pub(crate) struct Framer {
    pending: Vec<u8>,
    mid_line: bool,
}

impl Framer {
    /// Consumes `bytes`; appends every piece that is complete. Bytes that may still turn out to
    /// be the start of a marker, or an incomplete UTF-8 sequence, wait for the next call.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut Vec<Piece>) {
        self.pending.extend_from_slice(bytes);
        let buf = std::mem::take(&mut self.pending);
        let guard = FRAME_GUARD.as_bytes();
        let mut i = 0;
        let mut text_from = 0;
        let mut line_start = !self.mid_line;
        let mut waiting = false;
        while i < buf.len() {
            let rest = &buf[i..];
            let skip = if rest.starts_with(guard) {
                Some(guard.len())
            } else if line_start
                && LINE_START_MARKERS
                    .iter()
                    .any(|m| rest.starts_with(m.as_bytes()))
            {
                Some(0)
            } else {
                None
            };
            if let Some(skip) = skip {
                let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                    waiting = true;
                    break;
                };
                push_text(&buf[text_from..i], out);
                out.push(Piece::Control {
                    line: String::from_utf8_lossy(&rest[skip..nl]).into_owned(),
                    guarded: skip > 0,
                });
                i += nl + 1;
                text_from = i;
                line_start = true;
                continue;
            }
            // The bytes read so far may be the beginning of a marker: wait for more.
            if guard.starts_with(rest)
                || (line_start
                    && LINE_START_MARKERS
                        .iter()
                        .any(|m| m.as_bytes().starts_with(rest)))
            {
                waiting = true;
                break;
            }
            line_start = buf[i] == b'\n';
            i += 1;
        }
        let text_end = if waiting {
            i
        } else {
            i - incomplete_utf8_tail(&buf[text_from..i])
        };
        push_text(&buf[text_from..text_end], out);
        self.mid_line = if text_end > text_from {
            buf[text_end - 1] != b'\n'
        } else {
            !line_start
        };
        self.pending = buf[text_end..].to_vec();
    }

    /// End of the stream: whatever is pending is text.
    pub(crate) fn finish(&mut self, out: &mut Vec<Piece>) {
        let buf = std::mem::take(&mut self.pending);
        push_text(&buf, out);
        self.mid_line = false;
    }
}

fn push_text(bytes: &[u8], out: &mut Vec<Piece>) {
    if bytes.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(bytes);
    if let Some(Piece::Text(t)) = out.last_mut() {
        t.push_str(&text);
    } else {
        out.push(Piece::Text(text.into_owned()));
    }
}

/// Length of a UTF-8 sequence cut off at the end of `bytes` (0 if none): it is kept for the
/// next read instead of being decoded as U+FFFD.
pub(crate) fn incomplete_utf8_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte: look further back for the lead byte
        }
        let needed = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Reads a byte stream in chunks and delivers it as lossily decoded text, keeping a UTF-8
/// sequence split across reads whole (used for stderr, which has no markers).
pub(crate) fn read_text_chunks(
    mut reader: impl std::io::Read,
    mut deliver: impl FnMut(String) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        carry.extend_from_slice(&buf[..n]);
        let keep = incomplete_utf8_tail(&carry);
        let rest = carry.split_off(carry.len() - keep);
        let text = String::from_utf8_lossy(&carry).into_owned();
        carry = rest;
        if !text.is_empty() && !deliver(text) {
            return;
        }
    }
    if !carry.is_empty() {
        deliver(String::from_utf8_lossy(&carry).into_owned());
    }
}

/// Decodes the hex payload of an error frame (see `evcxr_internal_runtime::report_error`).
pub(crate) fn decode_hex(hex: &str) -> String {
    let bytes: Vec<u8> = hex
        .as_bytes()
        .chunks(2)
        .filter_map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        f.finish(&mut out);
        out
    }

    fn control(line: &str, guarded: bool) -> Piece {
        Piece::Control {
            line: line.to_owned(),
            guarded,
        }
    }

    #[test]
    fn guarded_frame_after_partial_line() {
        let input = format!("loss: {FRAME_GUARD}EVCXR_EXECUTION_COMPLETE\nnext");
        assert_eq!(
            frame(&[input.as_bytes()]),
            vec![
                Piece::Text("loss: ".into()),
                control("EVCXR_EXECUTION_COMPLETE", true),
                Piece::Text("next".into())
            ]
        );
    }

    #[test]
    fn frame_split_across_reads() {
        let input = format!("a{FRAME_GUARD}X 1\nb");
        let bytes = input.as_bytes();
        for cut in 0..bytes.len() {
            let mut out = frame(&[&bytes[..cut], &bytes[cut..]]);
            // Merge adjacent text pieces for comparison.
            let mut merged: Vec<Piece> = Vec::new();
            for p in out.drain(..) {
                match (merged.last_mut(), p) {
                    (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                    (_, p) => merged.push(p),
                }
            }
            assert_eq!(
                merged,
                vec![
                    Piece::Text("a".into()),
                    control("X 1", true),
                    Piece::Text("b".into())
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn line_start_markers_only_at_line_start() {
        assert_eq!(
            frame(&[b"EVCXR_BEGIN_CONTENT text/plain\nhi\nEVCXR_END_CONTENT\n"]),
            vec![
                control("EVCXR_BEGIN_CONTENT text/plain", false),
                Piece::Text("hi\n".into()),
                control("EVCXR_END_CONTENT", false)
            ]
        );
        assert_eq!(
            frame(&[b"x EVCXR_END_CONTENT\n"]),
            vec![Piece::Text("x EVCXR_END_CONTENT\n".into())]
        );
    }

    #[test]
    fn partial_text_is_delivered_and_invalid_utf8_is_replaced() {
        let mut f = Framer::default();
        let mut out = Vec::new();
        f.push(b"progress ", &mut out);
        assert_eq!(out, vec![Piece::Text("progress ".into())]);
        out.clear();
        // An invalid byte, then a split two-byte character.
        f.push(b"\xff ok \xc3", &mut out);
        f.push(b"\xa9\n", &mut out);
        let text: String = out
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(text, "\u{fffd} ok \u{e9}\n");
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(decode_hex("6869e282ac"), "hi\u{20ac}");
    }
}
