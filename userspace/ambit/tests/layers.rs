//! The node's shape, checked: no two top-level modules of userspace/ambit/src use each other
//! (directly or around a longer cycle), and every function ARCHITECTURE.md names exists.
//! Plain text scans of the sources, no build-time tooling.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`proxy` for src/proxy/inbound.rs), or None
/// for the crate root and the binary.
fn top_module(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_owned();
    (!["lib", "main"].contains(&name.as_str())).then_some(name)
}

/// The code of a file without its unit tests (they may use anything).
fn code(file: &Path) -> String {
    let text = fs::read_to_string(file).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Top-level modules a file names: `crate::x` anywhere, and `x` as a first segment inside
/// `use crate::{...}`.
fn used_modules(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the first segment of each top-level item.
            let (mut depth, mut item_start) = (0, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[i..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_ascii_lowercase() || c == '_') => {
                        let name: String = group[i..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        used.insert(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.insert(name);
        }
    }
    used.retain(|m| modules.contains(m));
    used
}

#[test]
fn no_module_cycle_between_the_nodes_layers() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = top_module(file) else {
            continue;
        };
        let mut used = used_modules(&code(file), &modules);
        used.remove(&module);
        graph.entry(module).or_default().extend(used);
    }
    // A cycle is a module that reaches itself.
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        let mut seen = BTreeSet::new();
        if let Some(cycle) = reaches(&graph, start, start, &mut path, &mut seen) {
            panic!("module cycle: {}", cycle.join(" → "));
        }
    }
    // The test sees what it is meant to: the tunnel uses HBONE, HBONE uses TLS.
    assert!(graph["proxy"].contains("hbone"), "{graph:?}");
    assert!(graph["hbone"].contains("tls"), "{graph:?}");
}

fn reaches(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    target: &str,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in graph.get(from).into_iter().flatten() {
        if next == target {
            let mut cycle = path.clone();
            cycle.push(next.clone());
            return Some(cycle);
        }
        if seen.insert(next.clone()) {
            path.push(next.clone());
            if let Some(cycle) = reaches(graph, next, target, path, seen) {
                return Some(cycle);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn every_function_architecture_md_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut sources = String::new();
    for dir in [src(), root.join("ebpf/ambit-ebpf/src")] {
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        for f in files {
            sources.push_str(&fs::read_to_string(f).unwrap());
        }
    }
    let mut checked = 0;
    for (i, span) in doc.split('`').enumerate() {
        // Odd pieces are inside backticks. A name is a Rust path whose last segment is a
        // lowercase identifier: a function, method or module.
        let is_path = span
            .split("::")
            .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        let last = span.rsplit("::").next().unwrap_or_default();
        if i % 2 == 0 || !is_path || !last.starts_with(|c: char| c.is_ascii_lowercase()) {
            continue;
        }
        let module_file = |name: &str| {
            sources.contains(&format!("pub mod {name};"))
                || sources.contains(&format!("mod {name};"))
        };
        let found = sources.contains(&format!("fn {last}("))
            || sources.contains(&format!("fn {last}<"))
            || module_file(last);
        assert!(
            found,
            "ARCHITECTURE.md names `{span}`, which does not exist"
        );
        // A `Type::method` needs the type too.
        if let Some(ty) = span
            .split("::")
            .find(|s| s.starts_with(|c: char| c.is_ascii_uppercase()))
        {
            assert!(
                sources.contains(&format!("struct {ty}")),
                "ARCHITECTURE.md names the type `{ty}`, which does not exist"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 20,
        "only {checked} names checked: is the doc's format still the same?"
    );
}
