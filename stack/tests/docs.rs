//! The documentation holds together: every relative link in README.md,
//! docs/ and the other READMEs points at a file that exists and, where it
//! names an anchor, at a heading that file has; and every variable the
//! services' configuration reads is in the configuration reference.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use stack::repo_root;

/// The lines of a Markdown text outside its fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// as hyphens; a repeated one gets `-1`, `-2`, ….
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(text) {
        let Some(heading) = line
            .strip_prefix('#')
            .map(|h| h.trim_start_matches('#'))
            .and_then(|h| h.strip_prefix(' '))
        else {
            continue;
        };
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut candidate = slug.clone();
        let mut n = 0;
        while seen.contains(&candidate) {
            n += 1;
            candidate = format!("{slug}-{n}");
        }
        seen.insert(candidate);
    }
    seen
}

/// Every `[label](target)` of the text's prose, inline code left out.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        // Inline code is not a link.
        let line: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, part)| part)
            .collect::<Vec<_>>()
            .join("");
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// The Markdown files whose links are checked.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![
        root.join("README.md"),
        root.join("model/README.md"),
        root.join("tests/compose/stand-ins/README.md"),
    ];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("docs entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files
}

#[test]
fn every_link_between_the_documents_and_every_anchor_it_names_resolve() {
    let root = repo_root();
    let mut broken = Vec::new();
    for file in documents(&root) {
        let text = std::fs::read_to_string(&file).expect("readable");
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a folder").join(path)
            };
            let shown = format!("{}: {link}", file.strip_prefix(&root).unwrap().display());
            if !target.exists() {
                broken.push(format!("{shown} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor {
                let text = std::fs::read_to_string(&target).unwrap_or_default();
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{shown} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_anchors_are_githubs() {
    let text = "# A title\n## Dead letters: `sagactl`\n```\n# not a heading\n```\n## A title\n";
    let found = anchors(text);
    assert!(
        found.contains("a-title") && found.contains("a-title-1"),
        "{found:?}"
    );
    assert!(found.contains("dead-letters-sagactl"), "{found:?}");
    assert!(!found.contains("not-a-heading"), "{found:?}");
    assert_eq!(
        links("see [x](a.md#b) and `[y](c.md)` and [z](#d)"),
        ["a.md#b", "#d"]
    );
}

/// The configuration reference is what the services' command lines make
/// of it: a setting added, renamed or re-documented in the code and not in
/// the file fails here.
#[test]
fn the_configuration_reference_is_generated_from_the_code() {
    let path = repo_root().join(stack::config_reference::PATH);
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == stack::config_reference::markdown(),
        "{} is not what the code generates: run `cargo run -p stack -- config-reference --write`",
        path.display()
    );
}

/// README's Layout section names every folder git holds at the top of the
/// repository, and every module folder of a crate (`src/<module>/`): a
/// folder added or moved without the map fails here.
#[test]
fn the_readme_layout_names_every_folder() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("\n## Layout\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Layout section");
    let files = std::process::Command::new("git")
        .arg("ls-files")
        .current_dir(&root)
        .output()
        .expect("git ls-files");
    let mut folders = BTreeSet::new();
    for path in String::from_utf8_lossy(&files.stdout).lines() {
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() > 1 {
            folders.insert(format!("{}/", parts[0]));
        }
        if let Some(at) = parts.iter().position(|p| *p == "src")
            && parts.len() > at + 2
        {
            folders.insert(format!("{}/", parts[at + 1]));
        }
    }
    let missing: Vec<&String> = folders
        .iter()
        .filter(|f| !section.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README's Layout does not name {missing:?}"
    );
}

/// The event contracts under common/contracts/ are what the code
/// generates: an event type, version or field changed in the code and not
/// in the files (or a file left over) fails here.
#[test]
fn the_event_contracts_are_generated_from_the_code() {
    let root = repo_root();
    let mut generated = stack::asyncapi::generated_files();
    generated.extend(stack::openapi::generated_files());
    let stale = "run `cargo run -p stack -- contracts --write`";
    for (path, text) in &generated {
        let committed = std::fs::read_to_string(root.join(path)).unwrap_or_default();
        assert!(
            committed == *text,
            "{path} is not what the code generates: {stale}"
        );
    }
    let dir = root.join(contracts::schema::DIR);
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = format!(
            "{}/{}",
            contracts::schema::DIR,
            entry.file_name().to_string_lossy()
        );
        assert!(
            generated.iter().any(|(p, _)| *p == path),
            "{path} is no longer generated: {stale}"
        );
    }
}
