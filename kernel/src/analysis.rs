//! Source-level helpers that need no compiler: `is_complete` and cursor offset conversion.

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

/// Whether a cell is complete: brackets balanced outside strings, chars and comments.
/// `incomplete` (with an indent) while something is open, `invalid` on a stray closer.
pub fn is_complete(code: &str) -> Value {
    let mut stack = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    let mut in_block_comment = 0usize;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if in_block_comment > 0 {
            if c == '*' && next == Some('/') {
                in_block_comment -= 1;
                i += 1;
            } else if c == '/' && next == Some('*') {
                in_block_comment += 1;
                i += 1;
            }
            i += 1;
            continue;
        }
        match c {
            '/' if next == Some('/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                in_block_comment = 1;
                i += 1;
            }
            '"' => {
                // Raw strings are rare in cells; treat r"..." like a normal string.
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if i >= chars.len() {
                    return json!({"status": "incomplete", "indent": ""});
                }
            }
            '\'' => {
                // A char literal ('a', '\n') or a lifetime ('a): skip only a literal.
                if next == Some('\\') {
                    i += 2;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                } else if chars.get(i + 2) == Some(&'\'') {
                    i += 2;
                }
            }
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return json!({"status": "invalid"});
                }
            }
            _ => {}
        }
        i += 1;
    }
    if in_block_comment > 0 || !stack.is_empty() {
        json!({"status": "incomplete", "indent": "    ".repeat(stack.len().max(1))})
    } else {
        json!({"status": "complete"})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness() {
        assert_eq!(is_complete("let x = 1;")["status"], "complete");
        assert_eq!(is_complete("fn f() {")["status"], "incomplete");
        assert_eq!(is_complete("let s = \"{\";")["status"], "complete");
        assert_eq!(is_complete("let c = '{'; // {")["status"], "complete");
        assert_eq!(is_complete("fn f<'a>(x: &'a str) {}")["status"], "complete");
        assert_eq!(is_complete("let v = vec![1, 2")["status"], "incomplete");
        assert_eq!(is_complete("}")["status"], "invalid");
        assert_eq!(is_complete("/* open")["status"], "incomplete");
    }

    #[test]
    fn offsets() {
        let s = "é = 1";
        assert_eq!(char_to_byte(s, 1), 2);
        assert_eq!(byte_to_char(s, 2), 1);
        assert_eq!(char_to_byte(s, 99), s.len());
    }
}
