//! `kapsel exec POD [-c C] [-i] [-t] -- CMD ARGS...`: a command in a pod's OCI container over
//! the API's exec WebSocket (`v5.channel.k8s.io`), on whichever node runs the pod. stdout and
//! stderr are copied out, stdin in with `-i`; the command's exit code becomes ours.

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::client::{path_for, Client};
use crate::api::exec::PROTOCOLS;
use crate::runtime::nodeapi::{
    exit_code_of, ExecQuery, CH_CLOSE, CH_STATUS, CH_STDERR, CH_STDIN, CH_STDOUT,
};

pub struct ExecArgs<'a> {
    pub pod: &'a str,
    pub container: Option<&'a str>,
    pub stdin: bool,
    pub tty: bool,
    pub command: Vec<String>,
}

pub async fn run(client: &Client, ns: &str, a: ExecArgs<'_>) -> Result<i32> {
    if a.command.is_empty() {
        bail!("usage: kapsel exec POD [-c CONTAINER] [-i] [-t] -- COMMAND [ARGS...]");
    }
    let base = client.url("");
    let Some(rest) = base.strip_prefix("http://") else {
        bail!("kapsel exec talks to the API over http:// (the loopback API), not {base}");
    };
    let q = ExecQuery {
        command: a.command,
        container: None,
        stdin: a.stdin,
        stdout: true,
        stderr: !a.tty,
        tty: a.tty,
    };
    let mut query = q.to_query();
    if let Some(c) = a.container {
        query.push_str(&format!("&container={}", super::urlencode(c)));
    }
    let url = format!(
        "ws://{rest}{}/exec?{query}",
        path_for("pods", ns, Some(a.pod))
    );
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        PROTOCOLS.join(", ").parse().expect("static header"),
    );
    let host = rest.split('/').next().unwrap_or(rest).to_string();
    let tcp = tokio::net::TcpStream::connect(&host)
        .await
        .with_context(|| format!("cannot reach the Kapsel server at {base}"))?;
    let (ws, _) = match tokio_tungstenite::client_async(req, tcp).await {
        Ok(x) => x,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("server answered {}", resp.status()));
            bail!("{msg}");
        }
        Err(e) => return Err(e).context("exec WebSocket"),
    };
    let (mut tx, mut rx) = ws.split();
    let feeder = a.stdin.then(|| {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut m = Vec::with_capacity(n + 1);
                m.push(CH_STDIN);
                m.extend_from_slice(&buf[..n]);
                if tx.send(Message::Binary(m.into())).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(Message::Binary(vec![CH_CLOSE, CH_STDIN].into()))
                .await;
            // Keep the sink open: closing it would end the exec before its output.
            std::future::pending::<()>().await;
        })
    });
    let (mut out, mut err) = (tokio::io::stdout(), tokio::io::stderr());
    let mut code = None;
    while let Some(m) = rx.next().await {
        let data = match m.context("exec stream interrupted")? {
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&ch, rest)) = data.split_first() else {
            continue;
        };
        match ch {
            CH_STDOUT => {
                out.write_all(rest).await?;
                out.flush().await?;
            }
            CH_STDERR => {
                err.write_all(rest).await?;
                err.flush().await?;
            }
            CH_STATUS => {
                let st: serde_json::Value =
                    serde_json::from_slice(rest).context("exec status is not JSON")?;
                match exit_code_of(&st) {
                    Some(c) => code = Some(c),
                    None => bail!(
                        "{}",
                        st["message"]
                            .as_str()
                            .unwrap_or("exec failed without a message")
                    ),
                }
            }
            _ => {}
        }
    }
    if let Some(f) = feeder {
        f.abort();
    }
    match code {
        Some(c) => Ok(i32::try_from(c).unwrap_or(1)),
        None => bail!("the exec ended without the command's exit status"),
    }
}
