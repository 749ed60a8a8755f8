//! The request guard: the API has no authentication and trusts whoever can reach its socket,
//! so it must not be reachable *through a browser* on the node. Every request passes three
//! checks before routing (as Docker's and Jupyter's local APIs do):
//!
//! 1. **Host** (DNS-rebinding protection): on a loopback listener the `Host` header must name
//!    the loopback — `localhost`, `127.x.y.z` or `[::1]`, any port — or a name given with
//!    `--allowed-host`. A page on `evil.example` whose name was re-pointed to 127.0.0.1 sends
//!    `Host: evil.example` and is refused. On a non-loopback listener the check applies only
//!    when `--allowed-host` names are given (loopback names, the listen address and those
//!    names are accepted); otherwise any `Host` is accepted, since the names the server is
//!    reached by are not known.
//! 2. **Origin**: a request carrying an `Origin` (browsers add it to every cross-origin write
//!    and to CORS reads) must come from the server's own origin, `http://<Host>`; and a
//!    `Sec-Fetch-Site` of `cross-site` or `same-site` is refused. Non-browser clients send
//!    neither header.
//! 3. **Content type**: POST, PUT and PATCH — and a DELETE with a body — must declare a body
//!    the API parses: `application/json` or `application/*+json`. A browser can send
//!    `text/plain`, form or multipart bodies cross-site without a CORS preflight; it cannot
//!    send JSON without one.
//!
//! Refusals are Kubernetes `Status` objects: 403 `Forbidden` for Host and Origin, 415
//! `UnsupportedMediaType` for the body.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The media types a write body may declare (the API parses JSON only).
pub const ACCEPTED_MEDIA_TYPES: &str = "application/json, application/*+json";

/// What the guard accepts; built once from the listen address and `--allowed-host`.
#[derive(Debug, Clone)]
pub struct RequestGuard {
    /// `None`: any `Host` is accepted (a non-loopback listener without `--allowed-host`).
    hosts: Option<AllowedHosts>,
}

#[derive(Debug, Clone)]
struct AllowedHosts {
    /// Extra names or addresses (lower case, without port), from `--allowed-host`.
    names: Vec<String>,
    /// The listen address itself when it is a specific, non-loopback one.
    listen_ip: Option<IpAddr>,
    /// Whether the listener is a loopback one (for the refusal message).
    loopback: bool,
}

impl RequestGuard {
    /// The guard of a server listening on `listen`, accepting also the `allowed_hosts` names.
    pub fn new(listen: SocketAddr, allowed_hosts: &[String]) -> Self {
        let ip = listen.ip();
        let loopback = ip.is_loopback();
        let names: Vec<String> = allowed_hosts
            .iter()
            .map(|h| normalize_name(strip_port(h.trim()).unwrap_or(h.trim())))
            .filter(|h| !h.is_empty())
            .collect();
        let hosts = (loopback || !names.is_empty()).then(|| AllowedHosts {
            names,
            listen_ip: (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip),
            loopback,
        });
        RequestGuard { hosts }
    }

    /// Does the `Host` check apply?
    pub fn checks_host(&self) -> bool {
        self.hosts.is_some()
    }

    /// Check one request's method, target and headers.
    pub fn check(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = headers
            .get(header::HOST)
            .map(|h| {
                h.to_str().map(str::to_string).map_err(|_| {
                    ApiError::Forbidden("request refused: the Host header is not ASCII".into())
                })
            })
            .transpose()?
            .or_else(|| uri.authority().map(|a| a.as_str().to_string()));
        if let (Some(allowed), Some(host)) = (&self.hosts, &host) {
            if !allowed.accepts(host) {
                let which = if allowed.loopback {
                    "this API listens on the loopback and answers only to localhost, 127.0.0.1 or [::1]"
                } else {
                    "it is not the listen address nor a name given with --allowed-host"
                };
                return Err(ApiError::Forbidden(format!(
                    "request refused: Host {host:?} is not a name of this server ({which}; \
                     protection against DNS rebinding). Add the name with `kapsel serve --allowed-host NAME` to allow it"
                )));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            let own = host
                .as_deref()
                .map(|h| same_origin(&origin, h))
                .unwrap_or(false);
            if !own {
                return Err(ApiError::Forbidden(format!(
                    "cross-origin request refused: Origin {origin:?} is not this server's origin; \
                     the API does not serve web pages, and browsers on this node may not use it"
                )));
            }
        }
        if let Some(site) = headers.get("sec-fetch-site") {
            let site = String::from_utf8_lossy(site.as_bytes()).to_ascii_lowercase();
            if site == "cross-site" || site == "same-site" {
                return Err(ApiError::Forbidden(format!(
                    "cross-site request refused (Sec-Fetch-Site: {site}); browsers on this node may not use the API"
                )));
            }
        }
        if needs_body_type(method, headers) {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            match ct.as_deref() {
                Some(ct) if is_json_media_type(ct) => {}
                // A module upload is raw bytes (a PUT: never a browser's simple request).
                Some(ct)
                    if method == Method::PUT
                        && crate::api::modules::is_upload_path(uri.path())
                        && crate::api::modules::is_module_media_type(ct) => {}
                Some(ct) => {
                    return Err(ApiError::UnsupportedMediaType(format!(
                        "the body of a {method} must be JSON: Content-Type {ct:?} is not supported; use one of {ACCEPTED_MEDIA_TYPES}"
                    )))
                }
                None => {
                    return Err(ApiError::UnsupportedMediaType(format!(
                        "the body of a {method} must be JSON: a Content-Type header is required, one of {ACCEPTED_MEDIA_TYPES}"
                    )))
                }
            }
        }
        Ok(())
    }
}

impl AllowedHosts {
    fn accepts(&self, host: &str) -> bool {
        let Some(name) = strip_port(host) else {
            return false;
        };
        let name = normalize_name(name);
        if name == "localhost" || self.names.contains(&name) {
            return true;
        }
        let ip = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(&name)
            .parse::<IpAddr>();
        match ip {
            Ok(ip) => is_loopback(ip) || Some(ip) == self.listen_ip,
            Err(_) => false,
        }
    }
}

/// `127.0.0.0/8`, `::1`, and `::ffff:127.x.y.z`.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6
                    .to_ipv4_mapped()
                    .map(|v4| v4.is_loopback())
                    .unwrap_or(false)
        }
    }
}

/// Lower case, without a trailing dot (`localhost.` is `localhost`).
fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The host of `host[:port]` / `[v6][:port]`; `None` when the port is not a number.
fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        return match rest.strip_prefix(':') {
            None if rest.is_empty() => Some(&host[..=end]),
            Some(p) if valid_port(p) => Some(&host[..=end]),
            _ => None,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => valid_port(p).then_some(h),
        // A bare IPv6 address without brackets is not a valid Host; compare it whole.
        Some(_) => Some(host),
        None => Some(host),
    }
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// `http://<host>` is the server's own origin (the default port 80 may be written or not).
fn same_origin(origin: &str, host: &str) -> bool {
    let Some(auth) = origin.strip_prefix("http://") else {
        return false;
    };
    let norm = |a: &str| {
        let a = a.to_ascii_lowercase();
        a.strip_suffix(":80").map(str::to_string).unwrap_or(a)
    };
    norm(auth) == norm(host)
}

/// POST, PUT and PATCH always carry a body; a DELETE when it says so.
fn needs_body_type(method: &Method, headers: &HeaderMap) -> bool {
    if method == Method::POST || method == Method::PUT || method == Method::PATCH {
        return true;
    }
    if method == Method::DELETE {
        let len = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        return len.map(|n| n > 0).unwrap_or(false)
            || headers.contains_key(header::TRANSFER_ENCODING);
    }
    false
}

/// `application/json` or `application/<anything>+json`, with any parameters.
pub fn is_json_media_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .map(|sub| sub.ends_with("+json") && sub.len() > "+json".len())
            .unwrap_or(false)
}

/// The axum middleware: refuse before routing, with a `Status`.
pub async fn middleware(
    State(guard): State<Arc<RequestGuard>>,
    req: Request,
    next: Next,
) -> Response {
    if let Err(e) = guard.check(req.method(), req.uri(), req.headers()) {
        tracing::warn!(method = %req.method(), uri = %req.uri(), reason = %e, "request refused");
        return e.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn loopback() -> RequestGuard {
        RequestGuard::new("127.0.0.1:7070".parse().unwrap(), &[])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn get(g: &RequestGuard, pairs: &[(&'static str, &str)]) -> Result<(), ApiError> {
        g.check(&Method::GET, &Uri::from_static("/healthz"), &headers(pairs))
    }

    #[test]
    fn loopback_hosts() {
        let g = loopback();
        for ok in [
            "localhost",
            "LOCALHOST:7070",
            "localhost.:1",
            "127.0.0.1",
            "127.1.2.3:7070",
            "[::1]",
            "[::1]:7070",
            "[::ffff:127.0.0.1]:7070",
        ] {
            assert!(get(&g, &[("host", ok)]).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7070",
            "localhost.evil.example",
            "10.0.0.1:7070",
            "[::2]:7070",
            "127.0.0.1:port",
            "0.0.0.0:7070",
        ] {
            assert!(
                matches!(get(&g, &[("host", bad)]), Err(ApiError::Forbidden(_))),
                "{bad}"
            );
        }
        // No Host at all (HTTP/1.0 tools): nothing to check.
        assert!(get(&g, &[]).is_ok());
    }

    #[test]
    fn non_loopback_listeners() {
        let any = RequestGuard::new("0.0.0.0:7070".parse().unwrap(), &[]);
        assert!(!any.checks_host());
        assert!(get(&any, &[("host", "node1.example:7070")]).is_ok());
        let named = RequestGuard::new(
            "10.1.2.3:7070".parse().unwrap(),
            &["Node1.example".to_string()],
        );
        assert!(get(&named, &[("host", "node1.example:7070")]).is_ok());
        assert!(get(&named, &[("host", "10.1.2.3:7070")]).is_ok());
        assert!(get(&named, &[("host", "localhost:7070")]).is_ok());
        assert!(get(&named, &[("host", "evil.example")]).is_err());
    }

    #[test]
    fn origins() {
        let g = loopback();
        let h = "127.0.0.1:7070";
        assert!(get(&g, &[("host", h), ("origin", "http://127.0.0.1:7070")]).is_ok());
        for bad in [
            "http://evil.example",
            "null",
            "https://127.0.0.1:7070",
            "http://127.0.0.1:7071",
            "http://localhost:7070",
        ] {
            assert!(get(&g, &[("host", h), ("origin", bad)]).is_err(), "{bad}");
        }
        assert!(get(&g, &[("host", h), ("sec-fetch-site", "cross-site")]).is_err());
        assert!(get(&g, &[("host", h), ("sec-fetch-site", "none")]).is_ok());
    }

    #[test]
    fn media_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/+json",
            "application/yaml",
            "text/json",
        ] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
        let g = loopback();
        let post = |h: &[(&'static str, &str)]| {
            g.check(
                &Method::POST,
                &Uri::from_static("/api/v1/namespaces/default/pods"),
                &headers(h),
            )
        };
        assert!(matches!(
            post(&[("content-type", "text/plain")]),
            Err(ApiError::UnsupportedMediaType(_))
        ));
        assert!(matches!(post(&[]), Err(ApiError::UnsupportedMediaType(_))));
        assert!(post(&[("content-type", "application/json")]).is_ok());
        let del = |h: &[(&'static str, &str)]| {
            g.check(&Method::DELETE, &Uri::from_static("/x"), &headers(h))
        };
        assert!(del(&[]).is_ok());
        assert!(del(&[("content-length", "0")]).is_ok());
        assert!(del(&[("content-length", "5"), ("content-type", "text/plain")]).is_err());
    }
}
