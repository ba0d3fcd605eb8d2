//! Source-level helpers that need no compiler: `is_complete`, syntax errors in a cell's own
//! terms, and cursor offset conversion.

use ra_ap_rustc_lexer::{self as lexer, LiteralKind, RawStrError, TokenKind};
use serde_json::{json, Value};

/// Jupyter offsets count Unicode code points; evcxr wants byte offsets.
pub fn char_to_byte(code: &str, chars: usize) -> usize {
    code.char_indices()
        .nth(chars)
        .map(|(b, _)| b)
        .unwrap_or(code.len())
}

pub fn byte_to_char(code: &str, byte: usize) -> usize {
    code.char_indices().take_while(|(b, _)| *b < byte).count()
}

/// Whether a cell is complete, from rustc's own lexer (`ra_ap_rustc_lexer`, the `rustc_lexer`
/// that rust-analyzer publishes): `incomplete` (with an indent) while a delimiter, string or
/// block comment is open; `invalid` on a closing delimiter that matches nothing or the wrong
/// opener, or on a malformed raw string; `complete` otherwise (the compiler judges the rest).
/// evcxr command lines (`:dep ...`) and shell lines (`!ls`) are not Rust and are skipped.
pub fn is_complete(code: &str) -> Value {
    let rust = blank_non_rust_lines(code);
    let mut stack: Vec<char> = Vec::new();
    let mut pos = 0usize;
    for token in lexer::tokenize(&rust, lexer::FrontmatterAllowed::No) {
        let text = &rust[pos..pos + token.len as usize];
        pos += token.len as usize;
        match token.kind {
            TokenKind::OpenParen => stack.push(')'),
            TokenKind::OpenBracket => stack.push(']'),
            TokenKind::OpenBrace => stack.push('}'),
            TokenKind::CloseParen | TokenKind::CloseBracket | TokenKind::CloseBrace => {
                let close = text.chars().next().unwrap_or(' ');
                if stack.pop() != Some(close) {
                    return json!({"status": "invalid"});
                }
            }
            TokenKind::BlockComment {
                terminated: false, ..
            } => return incomplete(stack.len()),
            TokenKind::Literal { kind, .. } => match kind {
                LiteralKind::Str { terminated: false }
                | LiteralKind::ByteStr { terminated: false }
                | LiteralKind::CStr { terminated: false } => return incomplete(stack.len()),
                LiteralKind::RawStr { n_hashes: None }
                | LiteralKind::RawByteStr { n_hashes: None }
                | LiteralKind::RawCStr { n_hashes: None } => {
                    let prefix = if text.starts_with('r') { 1 } else { 2 };
                    return match lexer::validate_raw_str(text, prefix) {
                        Err(RawStrError::NoTerminator { .. }) => incomplete(stack.len()),
                        _ => json!({"status": "invalid"}),
                    };
                }
                _ => {}
            },
            _ => {}
        }
    }
    if stack.is_empty() {
        json!({"status": "complete"})
    } else {
        incomplete(stack.len())
    }
}

fn incomplete(depth: usize) -> Value {
    json!({"status": "incomplete", "indent": "    ".repeat(depth.max(1))})
}

/// The cell with evcxr's command lines (`:dep ...`) and shell lines (`!ls`) blanked, so byte
/// offsets and line numbers stay those of the cell.
fn blank_non_rust_lines(code: &str) -> String {
    code.split_inclusive('\n')
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with(':') || line.starts_with('!') {
                line.chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' })
                    .collect()
            } else {
                line.to_string()
            }
        })
        .collect()
}

/// Syntax errors of a cell in its own terms (`line L, column C: message`, 1-based), from
/// rust-analyzer's parser, with the cell parsed as a block (statements, items and a final
/// expression, as evcxr treats it). Used when rustc's errors point only at the code evcxr
/// generates around the cell (`let a = std::` runs into evcxr's next line).
pub fn syntax_errors(code: &str) -> Vec<String> {
    const PREFIX: &str = "fn evcxr_cell() {\n";
    let wrapped = format!("{PREFIX}{}\n}}\n", blank_non_rust_lines(code));
    let parse = ra_ap_syntax::SourceFile::parse(&wrapped, ra_ap_syntax::Edition::CURRENT);
    parse
        .errors()
        .into_iter()
        .map(|e| {
            let offset = usize::from(e.range().start()).saturating_sub(PREFIX.len());
            let offset = offset.min(code.len());
            let before = &code[..offset];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("line {line}, column {column}: {e}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness() {
        let status = |code: &str| is_complete(code)["status"].as_str().unwrap().to_string();
        assert_eq!(status("let x = 1;"), "complete");
        assert_eq!(status("fn f() {"), "incomplete");
        assert_eq!(status("let s = \"{\";"), "complete");
        assert_eq!(status("let c = '{'; // {"), "complete");
        assert_eq!(status("fn f<'a>(x: &'a str) {}"), "complete");
        assert_eq!(status("let v = vec![1, 2"), "incomplete");
        assert_eq!(status("}"), "invalid");
        assert_eq!(status("(]"), "invalid");
        assert_eq!(status("/* open"), "incomplete");
        assert_eq!(status("let s = \"open"), "incomplete");
        // Raw strings (issue 10, item 5).
        assert_eq!(status(r#"let p = r"C:\dir\";"#), "complete");
        assert_eq!(status(r##"let s = r#"say "hi""#;"##), "complete");
        assert_eq!(status(r###"let j = r#"{"a": "}"}"#;"###), "complete");
        assert_eq!(status(r##"let s = r#"open"##), "incomplete");
        assert_eq!(status(":dep foo = { path = \"x\"\n1 + 1"), "complete");
        assert_eq!(is_complete("fn f() {\n if x {")["indent"], "        ");
    }

    #[test]
    fn syntax_errors_in_cell_terms() {
        let errors = syntax_errors("let b = 1;\nlet a = std::");
        assert!(!errors.is_empty());
        assert!(errors[0].starts_with("line 2, column "), "{errors:?}");
        assert!(syntax_errors("let a = 1;\na + 1").is_empty());
        assert!(syntax_errors(":dep x = \"1\"\nfn f() {}\nf()").is_empty());
    }

    #[test]
    fn offsets() {
        let s = "é = 1";
        assert_eq!(char_to_byte(s, 1), 2);
        assert_eq!(byte_to_char(s, 2), 1);
        assert_eq!(char_to_byte(s, 99), s.len());
    }
}
