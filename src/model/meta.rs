//! Object metadata shared by every kind: names, labels, uid, resourceVersion, timestamps.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `metadata` of every object, as in Kubernetes' `ObjectMeta` (the subset Kapsel uses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_grace_period_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
}

/// Points at the object that owns this one (a Deployment's revision owns its pods).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset.
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    /// The resourceVersion as a number (0 when unset or not numeric).
    pub fn rv(&self) -> u64 {
        self.resource_version
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// `apiVersion` + `kind`, read first from every manifest document to pick its type.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeMeta {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
}

/// Does `labels` satisfy a Kubernetes equality-based selector string (`a=b,c!=d,e`)?
pub fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(|x| x != v.trim()).unwrap_or(true)
            } else if let Some((k, v)) = term.split_once("==") {
                labels.get(k.trim()).map(|x| x == v.trim()).unwrap_or(false)
            } else if let Some((k, v)) = term.split_once('=') {
                labels.get(k.trim()).map(|x| x == v.trim()).unwrap_or(false)
            } else if let Some(k) = term.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let mut l = BTreeMap::new();
        l.insert("app".to_string(), "web".to_string());
        l.insert("tier".to_string(), "front".to_string());
        assert!(selector_matches("app=web", &l));
        assert!(selector_matches("app==web,tier", &l));
        assert!(!selector_matches("app=db", &l));
        assert!(selector_matches("app!=db", &l));
        assert!(!selector_matches("!tier", &l));
        assert!(selector_matches("", &l));
    }
}
