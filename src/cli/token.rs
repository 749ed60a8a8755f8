//! `kapsel token create|list|delete`: join tokens on the server's loopback API (the server
//! must run with `--cluster-listen`). `create` prints the whole token once; the server keeps
//! only its secret's hash.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use super::client::Client;

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Make a join token and print it (`K10<CA sha256>::<id>.<secret>`).
    Create {
        /// How long the token is good for; 0: it never expires.
        #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
        ttl: Duration,
        /// What the token is for (shown by `token list`).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the live tokens (ids, not secrets).
    List,
    /// Delete a token by id: it can no longer join nodes (joined nodes keep their certificates).
    Delete { id: String },
}

pub async fn run(client: &Client, cmd: TokenCmd) -> Result<i32> {
    match cmd {
        TokenCmd::Create { ttl, description } => {
            let v = client
                .post(
                    "/v1-kapsel/tokens",
                    &json!({"description": description, "ttlSeconds": ttl.as_secs()}),
                )
                .await?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        TokenCmd::List => {
            let v = client.get("/v1-kapsel/tokens").await?;
            let mut rows = vec![["ID", "EXPIRES", "DESCRIPTION"].map(String::from).to_vec()];
            for t in v["items"].as_array().into_iter().flatten() {
                rows.push(vec![
                    t["id"].as_str().unwrap_or_default().to_string(),
                    t["expires"].as_str().unwrap_or("never").to_string(),
                    t["description"].as_str().unwrap_or_default().to_string(),
                ]);
            }
            let widths: Vec<usize> = (0..3)
                .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
                .collect();
            for r in rows {
                println!(
                    "{:w0$}   {:w1$}   {}",
                    r[0],
                    r[1],
                    r[2],
                    w0 = widths[0],
                    w1 = widths[1]
                );
            }
        }
        TokenCmd::Delete { id } => {
            client.delete(&format!("/v1-kapsel/tokens/{id}")).await?;
            println!("token {id} deleted");
        }
    }
    Ok(0)
}
