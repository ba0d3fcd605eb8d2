//! `history_request`: this kernel session's inputs (every executed cell with `store_history`),
//! numbered by execution count. No persistence across kernel restarts.
//!
//! As in IPython: `tail` returns the last `n`; `range` the lines `start <= line < stop` of a
//! session (`session` 0 or negative or this session's number: this session; others are not
//! kept); `search` the inputs matching a glob `pattern` (`*`, `?`, `[...]`; the whole input
//! must match, as SQLite's GLOB in IPython), the most recent occurrence of each input when
//! `unique`, the last `n` when given. With `output: true` each entry is
//! `[session, line, [input, null]]` (outputs are not kept), else `[session, line, input]`.

use serde_json::{json, Value};

/// This kernel's session number in history entries.
pub const SESSION: i64 = 1;

pub fn reply(history: &[(u64, String)], request: &Value) -> Value {
    let output = request["output"].as_bool().unwrap_or(false);
    let n = request["n"].as_u64().map(|n| n as usize);
    let selected: Vec<&(u64, String)> = match request["hist_access_type"].as_str() {
        Some("tail") => last(history.iter().collect(), n),
        Some("range") => {
            let session = request["session"].as_i64().unwrap_or(0);
            if session > 0 && session != SESSION {
                Vec::new()
            } else {
                let start = request["start"].as_u64().unwrap_or(0);
                let stop = request["stop"].as_u64().unwrap_or(u64::MAX);
                history
                    .iter()
                    .filter(|(line, _)| *line >= start && *line < stop)
                    .collect()
            }
        }
        Some("search") => {
            let pattern = request["pattern"].as_str().unwrap_or("*");
            let Ok(pattern) = glob::Pattern::new(pattern) else {
                return json!({"status": "error", "ename": "ValueError",
                    "evalue": format!("invalid history search pattern {pattern:?}"), "traceback": [], "history": []});
            };
            let mut found: Vec<&(u64, String)> = history
                .iter()
                .filter(|(_, input)| pattern.matches(input))
                .collect();
            if request["unique"].as_bool().unwrap_or(false) {
                // Keep the most recent occurrence of each input, in order.
                let mut seen = std::collections::HashSet::new();
                found.reverse();
                found.retain(|(_, input)| seen.insert(input.as_str()));
                found.reverse();
            }
            last(found, n)
        }
        other => {
            return json!({"status": "error", "ename": "ValueError",
                "evalue": format!("unknown hist_access_type {other:?}"), "traceback": [], "history": []})
        }
    };
    let entries: Vec<Value> = selected
        .into_iter()
        .map(|(line, input)| {
            if output {
                json!([SESSION, line, [input, null]])
            } else {
                json!([SESSION, line, input])
            }
        })
        .collect();
    json!({"status": "ok", "history": entries})
}

fn last<T>(mut items: Vec<T>, n: Option<usize>) -> Vec<T> {
    if let Some(n) = n {
        let skip = items.len().saturating_sub(n);
        items.drain(..skip);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> Vec<(u64, String)> {
        [
            "6 * 7",
            "\"abc\".len()",
            "6 * 7",
            "\"abc\".len()",
            "let x = 1;",
        ]
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64 + 1, c.to_string()))
        .collect()
    }

    #[test]
    fn tail_range_search() {
        let h = history();
        let r = reply(&h, &json!({"hist_access_type": "tail", "n": 2}));
        assert_eq!(
            r["history"],
            json!([[1, 4, "\"abc\".len()"], [1, 5, "let x = 1;"]])
        );
        let r = reply(
            &h,
            &json!({"hist_access_type": "tail", "n": 1, "output": true}),
        );
        assert_eq!(r["history"], json!([[1, 5, ["let x = 1;", null]]]));
        let r = reply(
            &h,
            &json!({"hist_access_type": "range", "session": 1, "start": 2, "stop": 3}),
        );
        assert_eq!(r["history"], json!([[1, 2, "\"abc\".len()"]]));
        let r = reply(
            &h,
            &json!({"hist_access_type": "range", "session": 7, "start": 2, "stop": 3}),
        );
        assert_eq!(r["history"], json!([]));
        let search = |extra: Value| {
            let mut req = json!({"hist_access_type": "search", "pattern": "\"abc\"*"});
            for (k, v) in extra.as_object().unwrap() {
                req[k] = v.clone();
            }
            reply(&h, &req)["history"].as_array().unwrap().len()
        };
        assert_eq!(search(json!({})), 2);
        assert_eq!(search(json!({"unique": true})), 1);
        assert_eq!(search(json!({"n": 1})), 1);
        let r = reply(
            &h,
            &json!({"hist_access_type": "search", "pattern": "6 ?*"}),
        );
        assert_eq!(r["history"], json!([[1, 1, "6 * 7"], [1, 3, "6 * 7"]]));
    }
}
