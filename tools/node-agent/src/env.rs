//! A container's environment, built as the kubelet builds it: `envFrom` first, then
//! `env` in order (later names override earlier ones), `$(VAR)` in values expanded from
//! the variables defined before, and `$(VAR)` in command and args from all of them.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret};

/// The pod's fields the downward API (`fieldRef`) can read.
#[derive(Clone, Debug, Default)]
pub struct PodFields {
    /// `metadata.name`
    pub name: String,
    /// `metadata.namespace`
    pub namespace: String,
    /// `metadata.uid`
    pub uid: String,
    /// `metadata.labels`
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`
    pub annotations: BTreeMap<String, String>,
    /// `spec.nodeName`
    pub node_name: String,
    /// `spec.serviceAccountName`
    pub service_account: String,
    /// `status.podIP`
    pub pod_ip: String,
    /// `status.hostIP`
    pub host_ip: String,
}

impl PodFields {
    fn get(&self, path: &str) -> Option<String> {
        let indexed = |prefix: &str, map: &BTreeMap<String, String>| {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            Some(map.get(key).cloned().unwrap_or_default())
        };
        Some(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => self.service_account.clone(),
            "status.podIP" | "status.podIPs" => self.pod_ip.clone(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.clone(),
            _ => indexed("metadata.labels['", &self.labels)
                .or_else(|| indexed("metadata.annotations['", &self.annotations))?,
        })
    }
}

/// The Secrets and ConfigMaps of the pod's namespace that its containers reference;
/// one that does not exist is absent.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// Secret name → its data, decoded.
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// ConfigMap name → its data.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Sources {
    /// Adds a Secret as read from the API server.
    pub fn add_secret(&mut self, secret: &Secret) {
        let mut data: BTreeMap<String, String> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
            .collect();
        data.extend(secret.string_data.clone().unwrap_or_default());
        let name = secret.metadata.name.clone().unwrap_or_default();
        self.secrets.insert(name, data);
    }

    /// Adds a ConfigMap as read from the API server.
    pub fn add_config_map(&mut self, cm: &ConfigMap) {
        let mut data = cm.data.clone().unwrap_or_default();
        for (k, v) in cm.binary_data.iter().flatten() {
            data.insert(k.clone(), String::from_utf8_lossy(&v.0).into_owned());
        }
        let name = cm.metadata.name.clone().unwrap_or_default();
        self.config_maps.insert(name, data);
    }
}

/// Names of the Secrets and ConfigMaps `container` reads its environment from.
pub fn references(container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut secrets, mut config_maps) = (BTreeSet::new(), BTreeSet::new());
    for from in container.env_from.iter().flatten() {
        if let Some(s) = &from.secret_ref {
            secrets.insert(s.name.clone());
        }
        if let Some(c) = &from.config_map_ref {
            config_maps.insert(c.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            continue;
        };
        if let Some(s) = &from.secret_key_ref {
            secrets.insert(s.name.clone());
        }
        if let Some(c) = &from.config_map_key_ref {
            config_maps.insert(c.name.clone());
        }
    }
    (secrets, config_maps)
}

/// The environment variables, in definition order. Fails with the kubelet's kind of
/// message (`secret "x" not found`) when a non-optional reference cannot be resolved.
pub fn build(
    container: &Container,
    pod: &PodFields,
    sources: &Sources,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| match env
        .iter_mut()
        .find(|(n, _)| *n == name)
    {
        Some(slot) => slot.1 = value,
        None => env.push((name, value)),
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(s) = &from.secret_ref {
            ("secret", &s.name, s.optional, sources.secrets.get(&s.name))
        } else if let Some(c) = &from.config_map_ref {
            (
                "configmap",
                &c.name,
                c.optional,
                sources.config_maps.get(&c.name),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    set(&mut env, format!("{prefix}{k}"), v.clone());
                }
            }
            None if optional == Some(true) => {}
            None => return Err(format!("{kind} {name:?} not found")),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                if let Some(r) = &from.secret_key_ref {
                    match value_of(&sources.secrets, &r.name, &r.key) {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => return Err(missing("secret", &r.name, &r.key, sources)),
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    match value_of(&sources.config_maps, &r.name, &r.key) {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => return Err(missing("configmap", &r.name, &r.key, sources)),
                    }
                } else if let Some(f) = &from.field_ref {
                    pod.get(&f.field_path).ok_or_else(|| {
                        format!(
                            "env {}: fieldRef {:?} is not supported by the EventOps node agent",
                            var.name, f.field_path
                        )
                    })?
                } else {
                    return Err(format!(
                        "env {}: only value, secretKeyRef, configMapKeyRef and fieldRef are \
                         supported by the EventOps node agent",
                        var.name
                    ));
                }
            }
            (Some(value), None) => expand(value, |n| {
                env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
            }),
            (None, None) => String::new(),
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

fn value_of(
    maps: &BTreeMap<String, BTreeMap<String, String>>,
    name: &str,
    key: &str,
) -> Option<String> {
    maps.get(name).and_then(|m| m.get(key)).cloned()
}

fn missing(kind: &str, name: &str, key: &str, sources: &Sources) -> String {
    let exists = match kind {
        "secret" => sources.secrets.contains_key(name),
        _ => sources.config_maps.contains_key(name),
    };
    if exists {
        format!("couldn't find key {key} in {kind} {name:?}")
    } else {
        format!("{kind} {name:?} not found")
    }
}

/// Kubernetes' `$(VAR)` expansion: `$(NAME)` becomes the value `lookup` gives, or stays
/// as written when it gives none; `$$` is a literal `$`, so `$$(NAME)` stays `$(NAME)`.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource,
        ObjectFieldSelector, SecretEnvSource, SecretKeySelector,
    };

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(source),
        }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }
    }

    fn secret_key(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        }
    }

    fn pod() -> PodFields {
        PodFields {
            name: "p-1".into(),
            namespace: "shop".into(),
            uid: "u-1".into(),
            labels: BTreeMap::from([("app".into(), "inventory".into())]),
            node_name: "eventops-local".into(),
            service_account: "worker".into(),
            pod_ip: "127.1.0.7".into(),
            host_ip: "127.0.0.1".into(),
            ..Default::default()
        }
    }

    fn sources() -> Sources {
        Sources {
            secrets: BTreeMap::from([(
                "creds".into(),
                BTreeMap::from([
                    ("password".into(), "pw".into()),
                    ("user".into(), "u".into()),
                ]),
            )]),
            config_maps: BTreeMap::from([(
                "settings".into(),
                BTreeMap::from([("LEVEL".into(), "debug".into())]),
            )]),
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = |n: &str| match n {
            "A" => Some("a".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        for (input, want) in [
            ("$(A)", "a"),
            ("x$(A)y$(A)", "xaya"),
            ("$(EMPTY)-", "-"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$$(A)", "$(A)"),
            ("$$", "$"),
            ("$A", "$A"),
            ("$(A", "$(A"),
            ("cost: 5$", "cost: 5$"),
            ("", ""),
        ] {
            assert_eq!(expand(input, vars), want, "{input}");
        }
    }

    #[test]
    fn env_reads_values_references_and_fields_in_order() {
        let c = Container {
            name: "worker".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "settings".into(),
                    optional: None,
                }),
                prefix: Some("CFG_".into()),
                ..Default::default()
            }]),
            env: Some(vec![
                from("POD_IP", field("status.podIP")),
                var("ADDR", "$(POD_IP):8080"),
                var("LATER", "$(DEFINED_AFTER)"),
                var("DEFINED_AFTER", "x"),
                from("PASSWORD", secret_key("creds", "password", None)),
                from("NAME", field("metadata.name")),
                from("NS", field("metadata.namespace")),
                from("UID", field("metadata.uid")),
                from("NODE", field("spec.nodeName")),
                from("SA", field("spec.serviceAccountName")),
                from("HOST", field("status.hostIP")),
                from("APP", field("metadata.labels['app']")),
                var("LEVEL", "$(CFG_LEVEL)"),
                var("CFG_LEVEL", "override"),
            ]),
            ..Default::default()
        };
        let env = build(&c, &pod(), &sources()).unwrap();
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("ADDR"), Some("127.1.0.7:8080"));
        // Only variables defined before are expanded.
        assert_eq!(get("LATER"), Some("$(DEFINED_AFTER)"));
        assert_eq!(get("PASSWORD"), Some("pw"));
        assert_eq!(get("NAME"), Some("p-1"));
        assert_eq!(get("NS"), Some("shop"));
        assert_eq!(get("UID"), Some("u-1"));
        assert_eq!(get("NODE"), Some("eventops-local"));
        assert_eq!(get("SA"), Some("worker"));
        assert_eq!(get("HOST"), Some("127.0.0.1"));
        assert_eq!(get("APP"), Some("inventory"));
        assert_eq!(get("LEVEL"), Some("debug"));
        // env overrides envFrom, in place.
        assert_eq!(get("CFG_LEVEL"), Some("override"));
        assert_eq!(env[0].0, "CFG_LEVEL");
    }

    #[test]
    fn missing_references_fail_unless_optional() {
        let with = |vars: Vec<EnvVar>| Container {
            name: "c".into(),
            env: Some(vars),
            ..Default::default()
        };
        let err = build(
            &with(vec![from("P", secret_key("nope", "k", None))]),
            &pod(),
            &sources(),
        )
        .unwrap_err();
        assert_eq!(err, r#"secret "nope" not found"#);
        let err = build(
            &with(vec![from("P", secret_key("creds", "nokey", Some(false)))]),
            &pod(),
            &sources(),
        )
        .unwrap_err();
        assert_eq!(err, r#"couldn't find key nokey in secret "creds""#);
        let env = build(
            &with(vec![
                from("P", secret_key("nope", "k", Some(true))),
                from(
                    "C",
                    EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "settings".into(),
                            key: "missing".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    },
                ),
            ]),
            &pod(),
            &sources(),
        )
        .unwrap();
        assert!(env.is_empty());

        let env_from = |optional| Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: "nope".into(),
                    optional,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(build(&env_from(None), &pod(), &sources()).is_err());
        assert!(build(&env_from(Some(true)), &pod(), &sources()).is_ok());

        let err = build(
            &with(vec![from("X", field("spec.unknown"))]),
            &pod(),
            &sources(),
        )
        .unwrap_err();
        assert!(err.contains("spec.unknown"), "{err}");
    }

    #[test]
    fn references_list_secrets_and_config_maps() {
        let c = Container {
            name: "c".into(),
            env: Some(vec![from("P", secret_key("creds", "k", None))]),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "settings".into(),
                    optional: None,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let (s, c) = references(&c);
        assert_eq!(s, BTreeSet::from(["creds".to_string()]));
        assert_eq!(c, BTreeSet::from(["settings".to_string()]));
    }
}
