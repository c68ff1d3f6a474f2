//! Shared playbooks: the built-in pack (`playbooks/*.yml`, embedded in the
//! binary) and the server's `--playbooks-dir`, read once at start. Every
//! tenant sees them (read-only); a tenant playbook of the same name replaces
//! one for that tenant. A directory playbook replaces a built-in one of the
//! same name. A document that fails to load is logged with its file and line
//! and skipped; it never drops the others.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;

use crate::domain::playbook::yaml::{self, FileError};
use crate::domain::playbook::{Origin, Playbook, PlaybookDef};

/// The built-in pack: (file name, YAML).
pub const BUILTIN: [(&str, &str); 3] = [
    (
        "contain-brute-force.yml",
        include_str!("../../playbooks/contain-brute-force.yml"),
    ),
    (
        "disable-compromised-account.yml",
        include_str!("../../playbooks/disable-compromised-account.yml"),
    ),
    (
        "throttle-quota-breach.yml",
        include_str!("../../playbooks/throttle-quota-breach.yml"),
    ),
];

/// A playbook file's problem: `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackError {
    /// The file.
    pub file: String,
    /// Line and message.
    pub error: FileError,
}

impl std::fmt::Display for PackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}",
            self.file, self.error.line, self.error.message
        )
    }
}

/// Parses one file's text: its playbooks and its errors (as `file:line`).
pub fn parse_file(file: &str, text: &str) -> (Vec<PlaybookDef>, Vec<PackError>) {
    let mut defs = Vec::new();
    let mut errors = Vec::new();
    for doc in yaml::parse(text) {
        match doc {
            Ok(d) => defs.push(d),
            Err(es) => errors.extend(es.into_iter().map(|error| PackError {
                file: file.to_owned(),
                error,
            })),
        }
    }
    (defs, errors)
}

/// The built-in playbooks.
pub fn builtin() -> Vec<Playbook> {
    let now = Utc::now();
    BUILTIN
        .iter()
        .flat_map(|(file, text)| {
            let (defs, errors) = parse_file(file, text);
            assert!(errors.is_empty(), "built-in playbook {file}: {errors:?}");
            defs
        })
        .map(|d| Playbook::shared(Origin::Builtin, d, now))
        .collect()
}

/// The `*.yml` / `*.yaml` files directly in `dir`, or `path` itself if it is
/// a file, sorted by name.
pub fn yaml_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut paths = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("failed to read {}", path.display()))?
    {
        let p = entry
            .with_context(|| format!("failed to read {}", path.display()))?
            .path();
        let yaml = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yml" || e == "yaml");
        if yaml && p.is_file() {
            paths.push(p);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The playbooks of a file or directory, and every error (`file:line: …`).
/// Two documents of one name: the later is an error.
pub fn load_path(path: &Path) -> anyhow::Result<(Vec<PlaybookDef>, Vec<PackError>)> {
    let mut defs: Vec<PlaybookDef> = Vec::new();
    let mut errors = Vec::new();
    for p in yaml_files(path)? {
        let file = p.display().to_string();
        let text = std::fs::read_to_string(&p).with_context(|| format!("failed to read {file}"))?;
        let (found, errs) = parse_file(&file, &text);
        errors.extend(errs);
        for d in found {
            if defs.iter().any(|e| e.name == d.name) {
                let line = text
                    .lines()
                    .position(|l| l.trim_start().starts_with("name:") && l.contains(&d.name))
                    .map_or(1, |n| n + 1);
                errors.push(PackError {
                    file: file.clone(),
                    error: FileError {
                        line,
                        message: format!("a playbook named `{}` is defined twice", d.name),
                    },
                });
            } else {
                defs.push(d);
            }
        }
    }
    Ok((defs, errors))
}

/// The shared playbooks: the built-in pack, then `dir`'s (replacing
/// built-in ones of the same name). Bad documents are logged and skipped;
/// an unreadable directory is an error.
pub fn load(dir: Option<&Path>) -> anyhow::Result<Vec<Playbook>> {
    let mut shared = builtin();
    let Some(dir) = dir else {
        tracing::info!(playbooks = shared.len(), "built-in playbooks loaded");
        return Ok(shared);
    };
    let (defs, errors) = load_path(dir)?;
    for e in &errors {
        tracing::warn!(error = %e, "playbook rejected");
    }
    let now = Utc::now();
    for d in defs {
        shared.retain(|p| p.def.name != d.name);
        shared.push(Playbook::shared(Origin::Directory, d, now));
    }
    shared.sort_by(|a, b| a.def.name.cmp(&b.def.name));
    tracing::info!(playbooks = shared.len(), rejected = errors.len(), dir = %dir.display(), "playbooks loaded");
    Ok(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_pack_loads() {
        let names: Vec<String> = builtin().into_iter().map(|p| p.def.name).collect();
        assert_eq!(
            names,
            [
                "contain-brute-force",
                "disable-compromised-account",
                "throttle-quota-breach"
            ]
        );
    }

    #[test]
    fn directory_errors_name_file_and_line_and_skip_only_the_bad_document() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yml"),
            "name: contain-brute-force\nsteps:\n  - name: n\n    action: add_incident_note\n    params:\n      text: hi\n---\nname: bad\nsteps:\n  - name: n\n    action: add_incident_note\n    params:\n      text: \"{{nope}}\"\n",
        )
        .unwrap();
        let shared = load(Some(dir.path())).unwrap();
        let replaced = shared
            .iter()
            .find(|p| p.def.name == "contain-brute-force")
            .unwrap();
        assert_eq!(replaced.origin, Origin::Directory);
        assert!(!shared.iter().any(|p| p.def.name == "bad"));
        let (_, errors) = load_path(dir.path()).unwrap();
        let shown = errors[0].to_string();
        assert!(
            shown.ends_with(
                "a.yml:13: steps[0].params[text]: step `n`: unknown template `{{nope}}` \
                 (known: {{incident.id}}, {{incident.title}}, {{entity.ip}}, {{entity.actor}}, {{alert.id}})"
            ),
            "{shown}"
        );
    }
}
