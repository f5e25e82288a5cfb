//! The code's layout, checked: the import graph between the crate's top-level modules has no
//! cycle, `store/` knows no group, and the README's module graph is the current one.
//!
//! An edge `a --> b` means a file of module `a` names `crate::b` outside comments and unit
//! tests. After a change of the graph, `PAGEVIEWS_UPDATE_GRAPH=1 cargo test --test layout`
//! rewrites the README's copy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const BEGIN: &str = "<!-- module graph: begin (tests/layout.rs) -->";
const END: &str = "<!-- module graph: end -->";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments, string literals' `//` left alone, and without its
/// unit tests (everything from a top-level `#[cfg(test)]` on).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let code = match line.find(" //") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Module → the modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // A file's top-level module: `src/store/sql.rs` and `src/store.rs` are both `store`.
    let module_of = |f: &Path| {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        (first.trim_end_matches(".rs").to_owned(), rel.to_owned())
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f).0)
        .filter(|m| !["lib", "main", "bin"].contains(&m.as_str()))
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let (from, rel) = module_of(f);
        if !modules.contains(&from) || rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let targets = edges.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) && name != from {
                targets.insert(name);
            }
        }
    }
    edges
}

/// A cycle, if the graph has one (as the modules along it).
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut c = path[start..].to_vec();
                c.push(node.to_owned());
                return Some(c);
            }
            _ => {}
        }
        state.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// The graph as the README shows it (Mermaid).
fn mermaid(edges: &BTreeMap<String, BTreeSet<String>>) -> String {
    let mut out = String::from("```mermaid\ngraph LR\n");
    for (from, targets) in edges {
        for to in targets {
            out.push_str(&format!("  {from} --> {to}\n"));
        }
    }
    out.push_str("```\n");
    out
}

#[test]
fn the_module_graph_has_no_cycle() {
    let edges = graph();
    assert!(edges.len() > 10, "too few modules found: {edges:?}");
    if let Some(c) = cycle(&edges) {
        panic!("import cycle: {}", c.join(" -> "));
    }
}

#[test]
fn the_store_knows_no_group() {
    let edges = graph();
    let store = edges.get("store").cloned().unwrap_or_default();
    for group in ["aggregate", "alert", "serve", "preprocess", "import"] {
        assert!(
            !store.contains(group),
            "store/ names crate::{group}: {store:?}"
        );
    }
}

#[test]
fn the_readme_shows_the_current_module_graph() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let current = mermaid(&graph());
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        panic!("README.md has no module graph between {BEGIN} and {END}");
    };
    let shown = readme[b + BEGIN.len()..e].trim_matches('\n').to_owned() + "\n";
    if shown != current {
        if std::env::var_os("PAGEVIEWS_UPDATE_GRAPH").is_some() {
            let updated = format!("{}{BEGIN}\n{current}{}", &readme[..b], &readme[e..]);
            std::fs::write(&readme_path, updated).unwrap();
        } else {
            panic!(
                "the README's module graph is not the current one; run \
                 PAGEVIEWS_UPDATE_GRAPH=1 cargo test --test layout\n{current}"
            );
        }
    }
}
