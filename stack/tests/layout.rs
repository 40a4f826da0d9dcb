//! The workspace's modules import one another without circles: within a
//! crate, a module that another imports does not import it back, directly
//! or through others. (A circle means two files that can only be read
//! together.)

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use stack::repo_root;

/// Circles known and not yet undone, each as its modules in order: the
/// test fails on any other, and on one of these once it is gone (so the
/// list stays true).
const KNOWN: &[&[&str]] = &[];

/// The crate-level modules `text` names through `crate::`, its tests
/// (`#[cfg(test)]`, at the end of a file) left out.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first name of each item.
            let mut depth = 0;
            let mut item = String::new();
            let mut first = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !item.is_empty() {
                            found.insert(std::mem::take(&mut item));
                        }
                        first = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && first {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        found.insert(std::mem::take(&mut item));
                        first = false;
                    }
                }
            }
            if !item.is_empty() {
                found.insert(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

/// Every crate's modules (its `src/*.rs` and `src/*/`) and what each imports.
fn graphs(root: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut crates = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() && !name.starts_with('.') && name != "target" {
                dirs.push(path.clone());
            }
        }
        let src = dir.join("src");
        if !dir.join("Cargo.toml").exists() || !src.is_dir() {
            continue;
        }
        let mut modules = BTreeMap::new();
        for entry in std::fs::read_dir(&src).into_iter().flatten().flatten() {
            let path = entry.path();
            let (module, file) = if path.extension().is_some_and(|e| e == "rs") {
                let stem = path.file_stem().unwrap().to_string_lossy().to_string();
                (stem, path.clone())
            } else if path.join("mod.rs").exists() {
                let name = entry.file_name().to_string_lossy().to_string();
                (name, path.join("mod.rs"))
            } else {
                continue;
            };
            if ["lib", "main"].contains(&module.as_str()) {
                continue;
            }
            // A module in a folder imports what any of its files does.
            let mut files = vec![file];
            if path.is_dir() {
                files.extend(
                    std::fs::read_dir(&path)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "rs")),
                );
            }
            let mut found = BTreeSet::new();
            for file in files {
                found.extend(imports(&std::fs::read_to_string(&file).unwrap_or_default()));
            }
            found.remove(&module);
            modules.insert(module, found);
        }
        let name = dir.strip_prefix(root).unwrap().display().to_string();
        crates.insert(name, modules);
    }
    crates
}

/// Each circle of `graph`, once, starting at its smallest module.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, path)) = stack.pop() {
            for next in graph.get(&at).into_iter().flatten() {
                if !graph.contains_key(next) {
                    continue;
                }
                if next == start {
                    if path.iter().min() == Some(start) {
                        found.insert(path.clone());
                    }
                } else if !path.contains(next) && next > start {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mut all = BTreeSet::new();
    for (krate, graph) in graphs(&repo_root()) {
        for circle in circles(&graph) {
            let mut shown = circle.clone();
            shown[0] = format!("{krate}: {}", shown[0]);
            all.insert(shown);
        }
    }
    let known: BTreeSet<Vec<String>> = KNOWN
        .iter()
        .map(|c| c.iter().map(|s| s.to_string()).collect())
        .collect();
    let new: Vec<_> = all.difference(&known).collect();
    let gone: Vec<_> = known.difference(&all).collect();
    assert!(new.is_empty(), "import circles: {new:?}");
    assert!(
        gone.is_empty(),
        "no longer circles, take them off KNOWN: {gone:?}"
    );
}

#[test]
fn imports_and_circles_are_read_as_rust_writes_them() {
    let text = "use crate::{a, b::{c, d}, e::f};\nfn g() { crate::h::i(); }\n// crate::j\n";
    let found = imports(text);
    assert_eq!(
        found,
        ["a", "b", "e", "h"].iter().map(|s| s.to_string()).collect()
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("x", vec!["y"]),
        ("y", vec!["z"]),
        ("z", vec!["x"]),
        ("w", vec!["x"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    let found = circles(&graph);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found.into_iter().next().unwrap(), ["x", "y", "z"]);
}
