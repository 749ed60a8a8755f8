//! The CLI's side of the module store ([`crate::modules`]): `kapsel apply` / `kapsel up` upload
//! every local `.wasm` / `.wat` file the manifests reference (after a `HEAD` says the server
//! lacks it) and record its digest in the pod's (or pod template's)
//! `modules.kapsel.io/<container>` annotation, so the same manifest runs on any node.
//! `kapsel module push FILE` uploads one file and prints its digest; `kapsel module list`
//! lists the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::client::Client;
use super::manifest::Manifest;
use crate::api::modules::MODULES_PATH;
use crate::model::pod::is_wasm_image;
use crate::modules::{annotation_key, Digest};

/// Uploads above this size show their progress on stderr.
const PROGRESS_ABOVE: u64 = 4 << 20;

/// Upload the manifests' local modules and return the manifests with their digests recorded.
/// Each file is hashed and uploaded once per run however many manifests name it.
pub async fn attach(client: &Client, manifests: &[Manifest]) -> Result<Vec<Manifest>> {
    let mut out = manifests.to_vec();
    let mut done: HashMap<PathBuf, Digest> = HashMap::new();
    for m in &mut out {
        let holder = if m.object["spec"].get("template").is_some() {
            &mut m.object["spec"]["template"]
        } else if m.kind == "Pod" {
            &mut m.object
        } else {
            continue;
        };
        let mut found: Vec<(String, PathBuf)> = Vec::new();
        for list in ["initContainers", "containers"] {
            for c in holder["spec"][list].as_array().into_iter().flatten() {
                let (Some(name), Some(image)) = (c["name"].as_str(), c["image"].as_str()) else {
                    continue;
                };
                if !is_wasm_image(image) {
                    continue;
                }
                let path = PathBuf::from(image.strip_prefix("file://").unwrap_or(image));
                // A path that is not a file here is a path on the nodes, as before.
                if path.is_file() {
                    found.push((name.to_string(), path));
                }
            }
        }
        for (container, path) in found {
            let digest = match done.get(&path) {
                Some(d) => d.clone(),
                None => {
                    let d = push(client, &path)
                        .await
                        .with_context(|| format!("{} ({})", m.source, m.name))?;
                    done.insert(path.clone(), d.clone());
                    d
                }
            };
            if !holder["metadata"].is_object() {
                holder["metadata"] = serde_json::json!({});
            }
            let meta = &mut holder["metadata"];
            if !meta["annotations"].is_object() {
                meta["annotations"] = serde_json::json!({});
            }
            meta["annotations"][annotation_key(&container)] = Value::String(digest.to_string());
        }
    }
    Ok(out)
}

/// Upload one module unless the server has it; returns its digest.
pub async fn push(client: &Client, path: &Path) -> Result<Digest> {
    let p = path.to_path_buf();
    let digest = tokio::task::spawn_blocking(move || Digest::of_file(&p))
        .await?
        .with_context(|| format!("cannot read module {}", path.display()))?;
    let url = client.url(&format!("{MODULES_PATH}/{digest}"));
    let unreachable = |source| super::client::ClientError::Unreachable {
        url: client.url(""),
        source,
    };
    let head = client
        .http()
        .request(Method::HEAD, &url)
        .send()
        .await
        .map_err(unreachable)?;
    match head.status() {
        StatusCode::OK => return Ok(digest),
        StatusCode::NOT_FOUND => {}
        s => return Err(anyhow!("checking module {digest} on the server: HTTP {s}")),
    }
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot read module {}", path.display()))?;
    let size = file.metadata().await?.len();
    let show = size > PROGRESS_ABOVE;
    if show {
        eprintln!(
            "uploading {} ({:.1} MiB) as {digest}",
            path.display(),
            size as f64 / (1 << 20) as f64
        );
    }
    let sent = Arc::new(AtomicU64::new(0));
    let quarter = Arc::new(AtomicU64::new(0));
    let (s2, q2, name) = (sent.clone(), quarter.clone(), path.display().to_string());
    let body = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).inspect(move |c| {
        if let Ok(c) = c {
            let now = s2.fetch_add(c.len() as u64, Ordering::Relaxed) + c.len() as u64;
            let q = now * 4 / size.max(1);
            if show && q > q2.swap(q, Ordering::Relaxed) && q < 4 {
                eprintln!("  {name}: {}%", q * 25);
            }
        }
    });
    let started = std::time::Instant::now();
    let resp = client
        .http()
        .put(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status();
    if !status.is_success() {
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        return Err(super::client::api_error(status, &v))
            .with_context(|| format!("uploading module {}", path.display()));
    }
    if show {
        eprintln!(
            "uploaded {} in {:.1}s",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(digest)
}

/// `kapsel module list`: DIGEST SIZE STORED.
pub async fn list(client: &Client) -> Result<()> {
    let v = client.get(MODULES_PATH).await?;
    let mut rows = vec![vec!["DIGEST".to_string(), "SIZE".into(), "STORED".into()]];
    for m in v["items"].as_array().into_iter().flatten() {
        rows.push(vec![
            m["digest"].as_str().unwrap_or("").to_string(),
            crate::model::quantity::format_bytes(m["size"].as_u64().unwrap_or(0)),
            m["stored"].as_str().unwrap_or("").to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..3)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        println!(
            "{:<w0$}   {:<w1$}   {}",
            r[0],
            r[1],
            r[2],
            w0 = widths[0],
            w1 = widths[1]
        );
    }
    Ok(())
}
