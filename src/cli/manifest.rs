//! Reading manifests: multi-document YAML or JSON files (or a directory of them), strictly
//! typed, with errors that name the file, line, column and field; relative WASM image paths
//! resolved against the manifest's directory. Nesting is capped at [`MAX_DEPTH`] levels before
//! any parser runs (YAML parsing is quadratic in depth; serde_json stops at 128 on its own).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::pod::is_wasm_image;
use crate::model::{Deployment, Node, Pod, ReplicaSet, TypeMeta};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// `file:line:column: message`.
    #[error("{0}")]
    Invalid(String),
}

/// One object read from a file.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub object: Value,
    /// `file:line` where the document starts.
    pub source: String,
}

impl Manifest {
    pub fn resource(&self) -> &'static str {
        match self.kind.as_str() {
            "Pod" => "pods",
            "Node" => "nodes",
            "ReplicaSet" => "replicasets",
            _ => "deployments",
        }
    }
}

/// Files to read: the file itself, or the `*.yaml|*.yml|*.json` of a directory, sorted.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let meta = std::fs::metadata(path).map_err(|source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml") | Some("yml") | Some("json")
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Read every object of a file or directory.
pub fn load(path: &Path) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for f in files(path)? {
        let text = std::fs::read_to_string(&f).map_err(|source| ManifestError::Read {
            path: f.display().to_string(),
            source,
        })?;
        out.extend(parse(&text, &f)?);
    }
    Ok(out)
}

/// Parse the text of one file (`path` names it in errors and anchors relative images).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Manifest>, ManifestError> {
    let display = path.display().to_string();
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json")
        || text.trim_start().starts_with('{');
    let docs: Vec<(usize, String)> = if is_json {
        vec![(0, text.to_string())]
    } else {
        split_yaml(text)
    };
    let mut out = Vec::new();
    for (offset, doc) in docs {
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let m = if is_json {
            parse_json(&doc, &display)?
        } else {
            parse_yaml(&doc, offset, &display)?
        };
        out.extend(m);
    }
    for m in &mut out {
        resolve_images(&mut m.object, dir);
    }
    Ok(out)
}

/// Split a YAML stream at `---` lines: (line offset, document text).
fn split_yaml(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") && line[3..].trim().is_empty() {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 1;
            continue;
        }
        if line.starts_with("...") && line[3..].trim().is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs
}

fn yaml_err(
    e: &serde_norway::Error,
    offset: usize,
    file: &str,
    start_line: usize,
) -> ManifestError {
    let msg = e.to_string();
    let msg = match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    match e.location() {
        Some(loc) => ManifestError::Invalid(format!(
            "{file}:{}:{}: {msg}",
            loc.line() + offset,
            loc.column()
        )),
        None => ManifestError::Invalid(format!("{file}:{}: {msg}", start_line + offset + 1)),
    }
}

/// Deepest nesting a manifest may have (Kubernetes objects stay far below it).
pub const MAX_DEPTH: usize = 128;

/// A cheap, linear pre-scan of one YAML document: the nesting depth of each line —
/// block levels (indentation, `- ` and `? ` indicators) plus open flow collections (`[`, `{`)
/// outside quoted scalars, comments and block scalars. Refuses the document at the first line
/// deeper than [`MAX_DEPTH`]. It may count a level or two more than a YAML parser would (it
/// does not know every corner of YAML) but never misses a real nesting level.
fn check_depth(doc: &str, offset: usize, file: &str) -> Result<(), ManifestError> {
    let mut flow = 0usize;
    let mut block: Vec<usize> = Vec::new();
    // Inside a block scalar (`|`, `>`): lines indented deeper than this are text.
    let mut block_scalar: Option<usize> = None;
    // Inside a quoted scalar spanning lines (in flow context).
    let mut quote: Option<u8> = None;
    for (i, line) in doc.lines().enumerate() {
        let b = line.as_bytes();
        let indent = b.iter().take_while(|c| **c == b' ').count();
        let blank = b[indent..].iter().all(|c| c.is_ascii_whitespace());
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        if blank && quote.is_none() {
            continue;
        }
        let mut pos = indent;
        let mut depth_here;
        if flow == 0 && quote.is_none() {
            if b[pos] == b'#' {
                continue;
            }
            while block.last().is_some_and(|top| *top >= indent) {
                block.pop();
            }
            block.push(indent);
            depth_here = block.len();
            // `- `, `? ` and `: ` indicators at the start of a node each open a level.
            while let (Some(b'-' | b'?' | b':'), None | Some(b' ' | b'\t')) =
                (b.get(pos), b.get(pos + 1))
            {
                depth_here += 1;
                pos += 1;
                while matches!(b.get(pos), Some(b' ' | b'\t')) {
                    pos += 1;
                }
            }
        } else {
            depth_here = block.len();
        }
        let deny = || {
            ManifestError::Invalid(format!(
                "{file}:{}: nesting deeper than {MAX_DEPTH} levels (block indentation and `[`/`{{` \
                 collections); no Kubernetes object needs that — refusing before parsing",
                offset + i + 1
            ))
        };
        if depth_here + flow > MAX_DEPTH {
            return Err(deny());
        }
        // Walk the rest of the line.
        let mut node_start = true; // a flow collection or a quote may begin here
        while pos < b.len() {
            let c = b[pos];
            if let Some(q) = quote {
                if c == b'\\' && q == b'"' {
                    pos += 2;
                    continue;
                }
                if c == q {
                    if q == b'\'' && b.get(pos + 1) == Some(&b'\'') {
                        pos += 2;
                        continue;
                    }
                    quote = None;
                    node_start = false;
                }
                pos += 1;
                continue;
            }
            match c {
                b'#' if pos == 0 || matches!(b[pos - 1], b' ' | b'\t') => break,
                b'\'' | b'"' if node_start => {
                    quote = Some(c);
                    node_start = false;
                }
                b'[' | b'{' if flow > 0 || node_start => {
                    flow += 1;
                    if depth_here + flow > MAX_DEPTH {
                        return Err(deny());
                    }
                    node_start = true;
                }
                b']' | b'}' if flow > 0 => {
                    flow -= 1;
                    node_start = false;
                }
                b',' if flow > 0 => node_start = true,
                b' ' | b'\t' => {}
                // `&anchor` / `!tag` before a node: still at the node's start after them.
                b'&' | b'!' if node_start => {
                    while pos < b.len() && !matches!(b[pos], b' ' | b'\t') {
                        pos += 1;
                    }
                    continue;
                }
                b':' if matches!(b.get(pos + 1), None | Some(b' ' | b'\t')) => {
                    node_start = true;
                    if flow == 0 {
                        // `key: |` / `key: >-` starts a block scalar on the next lines.
                        let rest = line[pos + 1..].trim_start();
                        let rest = rest.split(" #").next().unwrap_or("").trim_end();
                        if rest.starts_with('|') || rest.starts_with('>') {
                            block_scalar = Some(indent);
                            break;
                        }
                    }
                }
                b'|' | b'>' if node_start && flow == 0 => {
                    block_scalar = Some(indent);
                    break;
                }
                _ => node_start = false,
            }
            pos += 1;
        }
    }
    Ok(())
}

fn parse_yaml(doc: &str, offset: usize, file: &str) -> Result<Vec<Manifest>, ManifestError> {
    check_depth(doc, offset, file)?;
    let generic: serde_norway::Value =
        serde_norway::from_str(doc).map_err(|e| yaml_err(&e, offset, file, 0))?;
    if !generic.is_mapping() {
        return Err(ManifestError::Invalid(format!(
            "{file}:{}: a manifest document must be a mapping with apiVersion, kind and metadata",
            offset + 1
        )));
    }
    let tm: TypeMeta = serde_norway::from_value(generic).unwrap_or_default();
    let source = format!("{file}:{}", offset + 1);
    let object = match tm.kind.as_str() {
        "Pod" => {
            let p: Pod = serde_norway::from_str(doc).map_err(|e| yaml_err(&e, offset, file, 0))?;
            serde_json::to_value(p).expect("pod serializes")
        }
        "Node" => {
            let n: Node = serde_norway::from_str(doc).map_err(|e| yaml_err(&e, offset, file, 0))?;
            serde_json::to_value(n).expect("node serializes")
        }
        "Deployment" => {
            let d: Deployment =
                serde_norway::from_str(doc).map_err(|e| yaml_err(&e, offset, file, 0))?;
            serde_json::to_value(d).expect("deployment serializes")
        }
        "ReplicaSet" => {
            let r: ReplicaSet =
                serde_norway::from_str(doc).map_err(|e| yaml_err(&e, offset, file, 0))?;
            serde_json::to_value(r).expect("replicaset serializes")
        }
        other => return Err(unsupported_kind(other, &tm.api_version, &source)),
    };
    Ok(vec![manifest(tm.kind, object, source)])
}

fn unsupported_kind(kind: &str, api_version: &str, source: &str) -> ManifestError {
    if kind.is_empty() {
        return ManifestError::Invalid(format!(
            "{source}: kind: Required value (e.g. `kind: Pod`)"
        ));
    }
    ManifestError::Invalid(format!(
        "{source}: unsupported kind {kind:?} (apiVersion {api_version:?}); supported kinds: Pod, Node, Deployment, ReplicaSet"
    ))
}

fn manifest(kind: String, object: Value, source: String) -> Manifest {
    Manifest {
        name: object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        namespace: object["metadata"]["namespace"].as_str().map(str::to_string),
        kind,
        object,
        source,
    }
}

fn parse_json(doc: &str, file: &str) -> Result<Vec<Manifest>, ManifestError> {
    let jerr = |e: serde_json::Error| {
        ManifestError::Invalid(format!(
            "{file}:{}:{}: {}",
            e.line(),
            e.column(),
            strip_json_loc(&e)
        ))
    };
    let generic: Value = serde_json::from_str(doc).map_err(jerr)?;
    let tm: TypeMeta = serde_json::from_value(generic.clone()).unwrap_or_default();
    let source = format!("{file}:1");
    match tm.kind.as_str() {
        "Pod" => {
            let p: Pod = serde_json::from_str(doc).map_err(jerr)?;
            Ok(vec![manifest(
                tm.kind,
                serde_json::to_value(p).unwrap(),
                source,
            )])
        }
        "Node" => {
            let n: Node = serde_json::from_str(doc).map_err(jerr)?;
            Ok(vec![manifest(
                tm.kind,
                serde_json::to_value(n).unwrap(),
                source,
            )])
        }
        "Deployment" => {
            let d: Deployment = serde_json::from_str(doc).map_err(jerr)?;
            Ok(vec![manifest(
                tm.kind,
                serde_json::to_value(d).unwrap(),
                source,
            )])
        }
        "ReplicaSet" => {
            let r: ReplicaSet = serde_json::from_str(doc).map_err(jerr)?;
            Ok(vec![manifest(
                tm.kind,
                serde_json::to_value(r).unwrap(),
                source,
            )])
        }
        "List" => {
            let mut out = Vec::new();
            for (i, item) in generic["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let src = format!("{file}: items[{i}]");
                let tm: TypeMeta = serde_json::from_value(item.clone()).unwrap_or_default();
                let obj = match tm.kind.as_str() {
                    "Pod" => serde_json::from_value::<Pod>(item)
                        .map(|p| serde_json::to_value(p).unwrap()),
                    "Node" => serde_json::from_value::<Node>(item)
                        .map(|n| serde_json::to_value(n).unwrap()),
                    "Deployment" => serde_json::from_value::<Deployment>(item)
                        .map(|d| serde_json::to_value(d).unwrap()),
                    "ReplicaSet" => serde_json::from_value::<ReplicaSet>(item)
                        .map(|r| serde_json::to_value(r).unwrap()),
                    other => return Err(unsupported_kind(other, &tm.api_version, &src)),
                }
                .map_err(|e| ManifestError::Invalid(format!("{src}: {}", strip_json_loc(&e))))?;
                out.push(manifest(tm.kind, obj, src));
            }
            Ok(out)
        }
        other => Err(unsupported_kind(other, &tm.api_version, &source)),
    }
}

fn strip_json_loc(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Make relative WASM image paths and `hostPath` volumes absolute, against the manifest's
/// directory.
fn resolve_images(obj: &mut Value, dir: &Path) {
    // Deployments and ReplicaSets carry a pod spec in `spec.template`.
    if let Some(t) = obj.get_mut("spec").and_then(|s| s.get_mut("template")) {
        resolve_images(t, dir);
        return;
    }
    for list in ["containers", "initContainers"] {
        if let Some(cs) = obj
            .get_mut("spec")
            .and_then(|s| s.get_mut(list))
            .and_then(|l| l.as_array_mut())
        {
            for c in cs {
                let Some(image) = c["image"].as_str().map(str::to_string) else {
                    continue;
                };
                if !is_wasm_image(&image) {
                    continue;
                }
                let (prefix, p) = match image.strip_prefix("file://") {
                    Some(rest) => ("file://", rest.to_string()),
                    None => ("", image.clone()),
                };
                if Path::new(&p).is_absolute() {
                    continue;
                }
                let abs = dir.join(&p);
                let abs = std::fs::canonicalize(&abs).unwrap_or_else(|_| {
                    std::env::current_dir()
                        .map(|cwd| cwd.join(&abs))
                        .unwrap_or(abs)
                });
                c["image"] = Value::String(format!("{prefix}{}", abs.display()));
            }
        }
    }
    // Relative `hostPath` volumes too (Kubernetes wants absolute ones; samples stay portable).
    if let Some(vols) = obj
        .get_mut("spec")
        .and_then(|s| s.get_mut("volumes"))
        .and_then(|v| v.as_array_mut())
    {
        for v in vols {
            let Some(p) = v["hostPath"]["path"].as_str().map(str::to_string) else {
                continue;
            };
            if Path::new(&p).is_absolute() {
                continue;
            }
            let abs = dir.join(&p);
            let abs = std::fs::canonicalize(&abs).unwrap_or(abs);
            v["hostPath"]["path"] = Value::String(abs.display().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_keeps_line_numbers() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\nspec:\n  containers:\n  - name: c\n    image: a.wasm\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: b\nspec:\n  containers:\n  - name: c\n    imagee: b.wasm\n";
        let err = parse(text, Path::new("x/pods.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x/pods.yaml:17:"), "{err}");
        assert!(err.contains("unknown field `imagee`"), "{err}");
    }

    #[test]
    fn resolves_relative_images() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\nspec:\n  containers:\n  - name: c\n    image: mods/a.wasm\n  - name: d\n    image: busybox\n";
        let m = parse(text, Path::new("/srv/app/pod.yaml")).unwrap();
        assert_eq!(
            m[0].object["spec"]["containers"][0]["image"],
            "/srv/app/mods/a.wasm"
        );
        assert_eq!(m[0].object["spec"]["containers"][1]["image"], "busybox");
    }

    #[test]
    fn malformed_yaml_has_line_and_column() {
        let err = parse("kind: Pod\nmetadata: [\n", Path::new("bad.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.yaml:"), "{err}");
        assert!(err.matches(':').count() >= 3, "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let t = std::time::Instant::now();
        let flow = format!("kind: Pod\nmetadata:\n  name: {}\n", "[".repeat(100_000));
        let err = parse(&flow, Path::new("deep.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("deep.yaml:3: nesting deeper than 128"),
            "{err}"
        );
        let seq = format!("kind: Pod\nspec:\n  x: 1\n{}a\n", "- ".repeat(100_000));
        let err = parse(&seq, Path::new("seq.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("seq.yaml:4: nesting deeper"), "{err}");
        let mut map = String::from("kind: Pod\n");
        for i in 0..200 {
            map.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        let err = parse(&map, Path::new("map.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("map.yaml:130: nesting deeper"), "{err}");
        let json = format!("{{\"kind\": {}", "[".repeat(100_000));
        let err = parse(&json, Path::new("deep.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("recursion limit exceeded"), "{err}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn ordinary_manifests_pass_the_depth_scan() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web # [ not a flow\n  annotations:\n    note: 'it''s [ fine {'\n    other: \"a [ \\\" {\"\n    plain: echo [ and { unbalanced\nspec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: c\n        image: busybox\n        command: [\"sh\", \"-c\", \"echo [[[[\"]\n        args:\n        - |\n          [[[[[[ {{{{{{\n          {[{[{[\n        env:\n        - name: X\n          value: >-\n            [[[[\n";
        let mut big = String::new();
        for _ in 0..40 {
            big.push_str(&text.replace("[[[[[[ {{{{{{", &"[".repeat(300)));
            big.push_str("---\n");
        }
        let m = parse(&big, Path::new("ok.yaml")).unwrap();
        assert_eq!(m.len(), 40);
        assert_eq!(
            m[0].object["spec"]["template"]["spec"]["containers"][0]["command"][2],
            "echo [[[["
        );
        // 100 levels of flow nesting are fine (below the cap).
        let ok = format!(
            "kind: Pod\nmetadata:\n  name: a\n  annotations:\n    x: {}{}\n",
            "[".repeat(100),
            "]".repeat(100)
        );
        let err = parse(&ok, Path::new("ok.yaml")).unwrap_err().to_string();
        assert!(!err.contains("nesting deeper"), "{err}");
    }
}
