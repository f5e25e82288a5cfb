//! `format=csv` on every panel endpoint: the same rows as the JSON, one header line, RFC 4180
//! quoting. Values come from log lines (strangers' text), so a cell that a spreadsheet would
//! run as a formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) is
//! neutralised with a leading `'` (OWASP's advice for CSV injection), and a cell with a comma,
//! a quote or a line break is quoted.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// One cell, neutralised and quoted as needed.
pub fn cell(value: &str) -> String {
    let neutral = match value.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{value}"),
        _ => value.to_owned(),
    };
    if neutral.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", neutral.replace('"', "\"\""))
    } else {
        neutral
    }
}

/// A table: a header line, then the rows, each line ended by CRLF (RFC 4180).
pub fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut out = header.join(",");
    out.push_str("\r\n");
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}

/// A CSV response (not cached: it changes with every flush), with a file name to save as.
pub fn response(name: &str, body: String) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // `name` is ours (a panel's name), never the client's.
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.csv\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

/// Reads back what [`table`] wrote (for tests and for anyone checking a round trip): the
/// header and the rows, quotes undone (the `'` of a neutralised cell stays: it is data now).
pub fn parse(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    if !cell.is_empty() || !row.is_empty() {
        row.push(cell);
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_cells_are_quoted_and_neutralised() {
        assert_eq!(cell("/index.html"), "/index.html");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("+1"), "'+1");
        assert_eq!(cell("-1"), "'-1");
        assert_eq!(cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(cell("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(cell(""), "");
    }

    #[test]
    fn a_table_reads_back() {
        let values = [
            "/a,b",
            "=1+2",
            "\"quoted\"",
            "multi\r\nline",
            "plain",
            "-",
            "é ✓",
        ];
        let text = table(
            &["value", "visits"],
            values
                .iter()
                .enumerate()
                .map(|(i, v)| vec![v.to_string(), i.to_string()]),
        );
        let rows = parse(&text);
        assert_eq!(rows[0], vec!["value", "visits"]);
        assert_eq!(rows.len(), values.len() + 1);
        for (i, v) in values.iter().enumerate() {
            let want = match v.as_bytes()[0] {
                b'=' | b'-' => format!("'{v}"),
                _ => v.to_string(),
            };
            assert_eq!(rows[i + 1], vec![want, i.to_string()]);
        }
    }
}
