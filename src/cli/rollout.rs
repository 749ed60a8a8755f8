//! `kapsel rollout status|history|undo|pause|resume|restart|promote|abort` and `kapsel scale`:
//! client-side, as kubectl does them — `undo` and `abort` write an earlier revision's template
//! back into the Deployment; `promote` marks the canary's revision promoted; `status` follows
//! the Deployment's status until the rollout completes or fails.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use serde_json::Value;

use super::client::{path_for, Client};
use super::output;
use super::parse_duration;
use crate::model::deployment::{
    revision_of, Deployment, ReplicaSet, COMPLETE_ANNOTATION, PROMOTED_ANNOTATION,
    ROLLBACK_MESSAGE_ANNOTATION, ROLLED_BACK_GENERATION_ANNOTATION, TEMPLATE_HASH_LABEL,
};

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Follow a rollout until it completes (exit 0) or fails its progress deadline (exit 1).
    Status {
        /// deployment/NAME
        target: String,
        /// Give up after this long.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        /// Keep following (false: print the current state once).
        #[arg(short = 'w', long, default_value_t = true, action = clap::ArgAction::Set)]
        watch: bool,
    },
    /// The revisions of a Deployment (its ReplicaSets), or one revision's template.
    History {
        target: String,
        #[arg(long)]
        revision: Option<i64>,
    },
    /// Go back to the previous revision (or --to-revision).
    Undo {
        target: String,
        #[arg(long)]
        to_revision: Option<i64>,
    },
    /// Stop the rollout where it is.
    Pause { target: String },
    /// Continue a paused rollout.
    Resume { target: String },
    /// Replace every pod with a new one (a rollout of the same template).
    Restart { target: String },
    /// Promote the canary waiting for promotion: the rollout continues.
    Promote { target: String },
    /// Abort the canary: the Deployment goes back to the previous revision.
    Abort { target: String },
}

/// `deployment/NAME`, `deploy/NAME`, `deployments/NAME` or `NAME`.
fn deployment_name(target: &str) -> Result<String> {
    match target.split_once('/') {
        None => Ok(target.to_string()),
        Some(("deployment" | "deployments" | "deploy", n)) if !n.is_empty() => Ok(n.to_string()),
        Some((kind, _)) => {
            bail!("this command works on deployments, not {kind:?}: use deployment/NAME")
        }
    }
}

async fn read(client: &Client, ns: &str, name: &str) -> Result<(Deployment, Value)> {
    let v = client.get(&path_for("deployments", ns, Some(name))).await?;
    Ok((serde_json::from_value(v.clone())?, v))
}

/// The ReplicaSets a Deployment owns.
async fn revisions(client: &Client, ns: &str, d: &Deployment) -> Result<Vec<ReplicaSet>> {
    let v = client.get(&path_for("replicasets", ns, None)).await?;
    let uid = d.metadata.uid.clone().unwrap_or_default();
    Ok(v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| serde_json::from_value::<ReplicaSet>(r).ok())
        .filter(|r| r.metadata.owner_references.iter().any(|o| o.uid == uid))
        .collect())
}

/// Read-modify-write the Deployment, retrying when someone else wrote first.
async fn update(
    client: &Client,
    ns: &str,
    name: &str,
    mut change: impl FnMut(&mut Deployment, &[ReplicaSet]) -> Result<()>,
    needs_history: bool,
) -> Result<Deployment> {
    for _ in 0..10 {
        let (mut d, _) = read(client, ns, name).await?;
        let rss = if needs_history {
            revisions(client, ns, &d).await?
        } else {
            vec![]
        };
        change(&mut d, &rss)?;
        let v = serde_json::to_value(&d)?;
        match client
            .put(&path_for("deployments", ns, Some(name)), &v)
            .await
        {
            Ok(v) => return Ok(serde_json::from_value(v)?),
            Err(e) if e.code() == Some(409) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("deployment {name:?} kept changing; try again")
}

/// Set the template of `revision` (or the one before the current; with `stable`, the newest
/// earlier one that completed) into `d`; returns it.
fn roll_back_to(
    d: &mut Deployment,
    rss: &[ReplicaSet],
    revision: Option<i64>,
    stable: bool,
) -> Result<i64> {
    if d.spec.paused == Some(true) {
        bail!(
            "you cannot roll back a paused deployment; resume it first with `kapsel rollout resume deployment/{}`",
            d.metadata.name
        );
    }
    let cur = revision_of(&d.metadata);
    let complete = rss.iter().filter(|rs| {
        rs.revision() < cur && rs.metadata.annotations.contains_key(COMPLETE_ANNOTATION)
    });
    if let (true, None, Some(rs)) = (stable, revision, complete.max_by_key(|rs| rs.revision())) {
        let mut t = rs.spec.template.clone();
        t.metadata.labels.remove(TEMPLATE_HASH_LABEL);
        d.spec.template = t;
        return Ok(rs.revision());
    }
    let target = match revision {
        Some(r) => rss
            .iter()
            .find(|rs| rs.revision() == r)
            .ok_or_else(|| anyhow!("unable to find the specified revision {r} in the history"))?,
        None => rss
            .iter()
            .filter(|rs| rs.revision() < cur)
            .max_by_key(|rs| rs.revision())
            .ok_or_else(|| {
                anyhow!(
                    "no rollout history found for deployment {:?}: there is no revision before {cur}",
                    d.metadata.name
                )
            })?,
    };
    let mut t = target.spec.template.clone();
    t.metadata.labels.remove(TEMPLATE_HASH_LABEL);
    d.spec.template = t;
    Ok(target.revision())
}

pub async fn scale(client: &Client, ns: &str, target: &str, replicas: i64) -> Result<i32> {
    let name = deployment_name(target)?;
    let body = serde_json::json!({"spec": {"replicas": replicas}});
    client
        .put(
            &format!("{}/scale", path_for("deployments", ns, Some(&name))),
            &body,
        )
        .await?;
    println!("deployment.apps/{name} scaled");
    Ok(0)
}

pub async fn run(client: &Client, ns: &str, cmd: RolloutCmd) -> Result<i32> {
    match cmd {
        RolloutCmd::Status {
            target,
            timeout,
            watch,
        } => status(client, ns, &deployment_name(&target)?, timeout, watch).await,
        RolloutCmd::History { target, revision } => {
            let name = deployment_name(&target)?;
            let (d, _) = read(client, ns, &name).await?;
            let rss = revisions(client, ns, &d).await?;
            match revision {
                None => {
                    println!("deployment.apps/{name}");
                    print!("{}", output::history_table(&rss));
                }
                Some(r) => {
                    let rs = rss.iter().find(|rs| rs.revision() == r).ok_or_else(|| {
                        anyhow!("unable to find revision {r} of deployment {name:?}")
                    })?;
                    println!("deployment.apps/{name} with revision #{r}");
                    print!(
                        "{}",
                        output::render(&serde_json::to_value(&rs.spec.template)?, "yaml")
                    );
                }
            }
            Ok(0)
        }
        RolloutCmd::Undo {
            target,
            to_revision,
        } => {
            let name = deployment_name(&target)?;
            let mut to = 0;
            update(
                client,
                ns,
                &name,
                |d, rss| {
                    to = roll_back_to(d, rss, to_revision, false)?;
                    Ok(())
                },
                true,
            )
            .await?;
            println!("deployment.apps/{name} rolled back (to the template of revision {to})");
            Ok(0)
        }
        RolloutCmd::Pause { target } => set_paused(client, ns, &target, true).await,
        RolloutCmd::Resume { target } => set_paused(client, ns, &target, false).await,
        RolloutCmd::Restart { target } => {
            let name = deployment_name(&target)?;
            let now = chrono::Utc::now().to_rfc3339();
            update(
                client,
                ns,
                &name,
                |d, _| {
                    d.spec
                        .template
                        .metadata
                        .annotations
                        .insert("kubectl.kubernetes.io/restartedAt".into(), now.clone());
                    Ok(())
                },
                false,
            )
            .await?;
            println!("deployment.apps/{name} restarted");
            Ok(0)
        }
        RolloutCmd::Promote { target } => {
            let name = deployment_name(&target)?;
            let mut rev = 0;
            update(
                client,
                ns,
                &name,
                |d, _| {
                    let c = waiting_canary(d)?;
                    rev = c.revision;
                    d.metadata
                        .annotations
                        .insert(PROMOTED_ANNOTATION.into(), c.pod_template_hash.clone());
                    Ok(())
                },
                false,
            )
            .await?;
            println!("deployment.apps/{name} canary of revision {rev} promoted");
            Ok(0)
        }
        RolloutCmd::Abort { target } => {
            let name = deployment_name(&target)?;
            let (mut rev, mut to) = (0, 0);
            update(
                client,
                ns,
                &name,
                |d, rss| {
                    let c = waiting_canary(d)?;
                    rev = c.revision;
                    to = roll_back_to(d, rss, None, true)?;
                    Ok(())
                },
                true,
            )
            .await?;
            println!("deployment.apps/{name} canary of revision {rev} aborted; back to the template of revision {to}");
            Ok(0)
        }
    }
}

/// The canary a Deployment is waiting to promote, or an error saying there is none.
fn waiting_canary(d: &Deployment) -> Result<crate::model::deployment::CanaryStatus> {
    d.status
        .as_ref()
        .and_then(|s| s.canary.clone())
        .filter(|c| !c.promoted)
        .ok_or_else(|| {
            anyhow!(
                "deployment {:?} has no canary waiting for promotion",
                d.metadata.name
            )
        })
}

async fn set_paused(client: &Client, ns: &str, target: &str, pause: bool) -> Result<i32> {
    let name = deployment_name(target)?;
    update(
        client,
        ns,
        &name,
        |d, _| {
            d.spec.paused = pause.then_some(true);
            Ok(())
        },
        false,
    )
    .await?;
    println!(
        "deployment.apps/{name} {}",
        if pause { "paused" } else { "resumed" }
    );
    Ok(0)
}

/// kubectl's rollout status messages; `Ok(true)` when the rollout is complete.
fn rollout_message(d: &Deployment) -> Result<(bool, String)> {
    let name = &d.metadata.name;
    let st = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(1) > st.observed_generation {
        return Ok((
            false,
            "Waiting for deployment spec update to be observed...".into(),
        ));
    }
    if let Some(c) = st.condition("Progressing") {
        if c.reason.as_deref() == Some("ProgressDeadlineExceeded") {
            bail!("deployment {name:?} exceeded its progress deadline");
        }
    }
    if let Some(c) = &st.canary {
        if !c.promoted {
            return Ok((
                false,
                format!(
                    "Waiting for deployment {name:?} canary (revision {}): {} of {} canaries available; `kapsel rollout promote deployment/{name}` or `kapsel rollout abort deployment/{name}`",
                    c.revision, c.ready, c.desired
                ),
            ));
        }
    }
    let want = d.spec.replicas();
    if st.updated_replicas < want {
        return Ok((
            false,
            format!(
                "Waiting for deployment {name:?} rollout to finish: {} out of {want} new replicas have been updated...",
                st.updated_replicas
            ),
        ));
    }
    if st.replicas > st.updated_replicas {
        return Ok((
            false,
            format!(
                "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
                st.replicas - st.updated_replicas
            ),
        ));
    }
    if st.available_replicas < st.updated_replicas {
        return Ok((
            false,
            format!(
                "Waiting for deployment {name:?} rollout to finish: {} of {} updated replicas are available...",
                st.available_replicas, st.updated_replicas
            ),
        ));
    }
    Ok((true, format!("deployment {name:?} successfully rolled out")))
}

async fn status(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    watch: bool,
) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    // The generation this command watches: if the controller rolls it back, the rollout failed,
    // even though the Deployment then completes (on the earlier template).
    let mut first_generation: Option<i64> = None;
    loop {
        let (d, _) = read(client, ns, name).await?;
        let generation = d.metadata.generation.unwrap_or(1);
        let watched = *first_generation.get_or_insert(generation);
        if let Some(failed) = d
            .metadata
            .annotations
            .get(ROLLED_BACK_GENERATION_ANNOTATION)
            .and_then(|g| g.parse::<i64>().ok())
        {
            if failed >= watched {
                let why = d
                    .metadata
                    .annotations
                    .get(ROLLBACK_MESSAGE_ANNOTATION)
                    .cloned()
                    .unwrap_or_else(|| "it was rolled back".into());
                bail!("the rollout of deployment {name:?} failed and was rolled back: {why}");
            }
        }
        let (done, msg) = rollout_message(&d)?;
        if msg != last {
            println!("{msg}");
            last = msg;
        }
        if done || !watch {
            return Ok(0);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for the rollout of deployment {name:?} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
