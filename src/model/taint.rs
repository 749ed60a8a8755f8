//! Taints (on a node's spec) and tolerations (on a pod's spec), as in Kubernetes: a taint
//! repels pods that do not tolerate it — `NoSchedule` keeps new pods off, `PreferNoSchedule`
//! only ranks the node lower, `NoExecute` also evicts running pods, after the toleration's
//! `tolerationSeconds` when it has one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Set by the node lifecycle controller on a node whose heartbeats stopped.
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// A node that reports itself not ready.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Shown on a cordoned node (`spec.unschedulable`).
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: TaintEffect,
    /// When a `NoExecute` taint was added: `tolerationSeconds` count from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_added: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    /// Empty with operator `Exists`: tolerates every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<TolerationOperator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Empty: every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// With `NoExecute`: how long the pod stays after the taint appears (unset: forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

impl Taint {
    pub fn new(key: &str, effect: TaintEffect) -> Taint {
        Taint {
            key: key.into(),
            value: None,
            effect,
            time_added: None,
        }
    }

    /// Parse `key[=value]:Effect` (the `--node-taint` / `kubectl taint` form).
    pub fn parse(s: &str) -> Result<Taint, String> {
        let (kv, effect) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("taint {s:?}: expected key[=value]:Effect"))?;
        let effect = match effect {
            "NoSchedule" => TaintEffect::NoSchedule,
            "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
            "NoExecute" => TaintEffect::NoExecute,
            e => {
                return Err(format!(
                    "taint {s:?}: effect {e:?} is not NoSchedule, PreferNoSchedule or NoExecute"
                ))
            }
        };
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (kv, None),
        };
        if key.is_empty() {
            return Err(format!("taint {s:?}: empty key"));
        }
        Ok(Taint {
            key: key.into(),
            value: value.filter(|v| !v.is_empty()),
            effect,
            time_added: None,
        })
    }
}

impl Toleration {
    /// Does this toleration tolerate `taint` (Kubernetes' `ToleratesTaint`)?
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if let Some(e) = self.effect {
            if e != taint.effect {
                return false;
            }
        }
        let key = self.key.as_deref().unwrap_or("");
        if !key.is_empty() && key != taint.key {
            return false;
        }
        match self.operator.unwrap_or_default() {
            TolerationOperator::Exists => true,
            TolerationOperator::Equal => {
                self.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
            }
        }
    }

    /// Field errors of one toleration at `field`.
    pub fn validate(&self, field: &str) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let key = self.key.as_deref().unwrap_or("");
        match self.operator.unwrap_or_default() {
            TolerationOperator::Exists => {
                if self.value.as_deref().is_some_and(|v| !v.is_empty()) {
                    errs.push((
                        format!("{field}.value"),
                        "must be empty when operator is Exists".into(),
                    ));
                }
            }
            TolerationOperator::Equal => {
                if key.is_empty() {
                    errs.push((
                        format!("{field}.operator"),
                        "must be Exists when key is empty".into(),
                    ));
                }
            }
        }
        if let Some(s) = self.toleration_seconds {
            if self.effect != Some(TaintEffect::NoExecute) {
                errs.push((
                    format!("{field}.tolerationSeconds"),
                    "only allowed with effect NoExecute".into(),
                ));
            } else if s < 0 {
                errs.push((
                    format!("{field}.tolerationSeconds"),
                    "must be 0 or more".into(),
                ));
            }
        }
        errs
    }
}

/// The taints of `taints` with `effect` that no toleration of `tols` tolerates.
pub fn untolerated<'a>(
    taints: &'a [Taint],
    tols: &'a [Toleration],
    effect: TaintEffect,
) -> impl Iterator<Item = &'a Taint> {
    taints
        .iter()
        .filter(move |t| t.effect == effect && !tols.iter().any(|tol| tol.tolerates(t)))
}

/// How long a pod may stay on a node with these `NoExecute` taints: `None` forever, `Some(0)`
/// not at all, else the least `tolerationSeconds` of the tolerations used (Kubernetes' taint
/// manager rule).
pub fn no_execute_allowance(taints: &[Taint], tols: &[Toleration]) -> Option<i64> {
    let mut least: Option<i64> = None;
    for t in taints.iter().filter(|t| t.effect == TaintEffect::NoExecute) {
        let matching: Vec<&Toleration> = tols.iter().filter(|tol| tol.tolerates(t)).collect();
        if matching.is_empty() {
            return Some(0);
        }
        // A toleration without seconds tolerates it forever.
        if matching.iter().any(|m| m.toleration_seconds.is_none()) {
            continue;
        }
        let s = matching
            .iter()
            .filter_map(|m| m.toleration_seconds)
            .min()
            .unwrap_or(0)
            .max(0);
        least = Some(least.map_or(s, |l| l.min(s)));
    }
    least
}

/// The `DefaultTolerationSeconds` admission rule: a pod without a toleration for the
/// not-ready / unreachable `NoExecute` taints gets one for `seconds`.
pub fn add_default_tolerations(tols: &mut Vec<Toleration>, seconds: i64) {
    for key in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
        let probe = Taint {
            key: key.into(),
            value: None,
            effect: TaintEffect::NoExecute,
            time_added: None,
        };
        if tols.iter().any(|t| t.tolerates(&probe)) {
            continue;
        }
        tols.push(Toleration {
            key: Some(key.into()),
            operator: Some(TolerationOperator::Exists),
            value: None,
            effect: Some(TaintEffect::NoExecute),
            toleration_seconds: Some(seconds),
        });
    }
}

/// Carry the default tolerations admission gave `cur` over to `want` (a re-applied manifest
/// does not have them), so the two compare equal when nothing else changed.
pub fn keep_default_tolerations(want: &mut Vec<Toleration>, cur: &[Toleration]) {
    for key in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
        let probe = Taint::new(key, TaintEffect::NoExecute);
        if want.iter().any(|t| t.tolerates(&probe)) {
            continue;
        }
        if let Some(t) = cur.iter().find(|t| {
            t.key.as_deref() == Some(key)
                && t.operator == Some(TolerationOperator::Exists)
                && t.effect == Some(TaintEffect::NoExecute)
        }) {
            want.push(t.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tol(
        key: &str,
        op: TolerationOperator,
        value: &str,
        effect: Option<TaintEffect>,
    ) -> Toleration {
        Toleration {
            key: (!key.is_empty()).then(|| key.to_string()),
            operator: Some(op),
            value: (!value.is_empty()).then(|| value.to_string()),
            effect,
            toleration_seconds: None,
        }
    }

    #[test]
    fn matching_follows_kubernetes() {
        let t = Taint::parse("dedicated=gpu:NoSchedule").unwrap();
        assert_eq!(t.value.as_deref(), Some("gpu"));
        use TolerationOperator::*;
        assert!(tol("dedicated", Equal, "gpu", None).tolerates(&t));
        assert!(!tol("dedicated", Equal, "cpu", None).tolerates(&t));
        assert!(tol("dedicated", Exists, "", Some(TaintEffect::NoSchedule)).tolerates(&t));
        assert!(!tol("dedicated", Exists, "", Some(TaintEffect::NoExecute)).tolerates(&t));
        assert!(tol("", Exists, "", None).tolerates(&t));
        assert!(Taint::parse("a=b").is_err());
        assert!(Taint::parse("a:Sometimes")
            .unwrap_err()
            .contains("Sometimes"));
    }

    #[test]
    fn allowance_is_the_least_seconds() {
        let mut tols = Vec::new();
        add_default_tolerations(&mut tols, 2);
        assert_eq!(tols.len(), 2);
        add_default_tolerations(&mut tols, 9);
        assert_eq!(tols.len(), 2, "not added twice");
        let un = vec![Taint::new(TAINT_UNREACHABLE, TaintEffect::NoExecute)];
        assert_eq!(no_execute_allowance(&un, &tols), Some(2));
        assert_eq!(no_execute_allowance(&un, &[]), Some(0));
        let forever = vec![tol("", TolerationOperator::Exists, "", None)];
        assert_eq!(no_execute_allowance(&un, &forever), None);
        let other = vec![Taint::new("x", TaintEffect::NoSchedule)];
        assert_eq!(no_execute_allowance(&other, &[]), None);
    }
}
