//! Command-line and environment configuration of `eventops-operator run`.

use std::collections::BTreeMap;

use anyhow::bail;

use crate::kafka::KafkaSettings;

/// Default naming policy, `<domain>.<aggregate>.<past-tense-verb>`: three lower-case
/// dot-separated words, the last ending in `ed` or a common irregular past tense.
pub const DEFAULT_TOPIC_NAMING_PATTERN: &str = r"^[a-z][a-z0-9-]*\.[a-z][a-z0-9-]*\.([a-z][a-z0-9-]*ed|sent|paid|built|made|held|sold|bought|done|won|lost|set|put|cut|shut|split|spent|lent|written|taken|given|chosen|frozen|broken|drawn|seen|known|shown|thrown|grown|hidden|read|found|left|kept|met|told|caught|taught|brought|run)$";

/// `--max-concurrent-reconciles` unless set: in `tools/bench-operator 1000`, 48 reached
/// Ready in 133.8 s at 102 MiB, 16 in 162.2 s at 95 MiB (README, operator benchmark).
pub const DEFAULT_MAX_CONCURRENT_RECONCILES: u16 = 48;

/// Settings of `eventops-operator run`. Every flag can also come from the environment.
#[derive(clap::Args, Clone, Debug)]
pub struct RunConfig {
    /// Kafka bootstrap servers (`host:port,...`).
    #[arg(long, env = "EVENTOPS_KAFKA_BOOTSTRAP")]
    pub kafka_bootstrap: String,

    /// Kafka security protocol. Defaults to SASL_PLAINTEXT when a SASL user is given,
    /// PLAINTEXT otherwise.
    #[arg(long, env = "EVENTOPS_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,

    /// SASL mechanism.
    #[arg(
        long,
        env = "EVENTOPS_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512"
    )]
    pub kafka_sasl_mechanism: String,

    /// SASL user the operator authenticates as: a user of its own, not a super user. The
    /// exact ACLs it needs are listed in the README ("Kafka permissions of the operator"):
    /// Cluster `Alter`, and `Create`, `Delete`, `Alter`, `AlterConfigs` and `Read` on the
    /// topics it manages and on `__consumer_offsets`.
    #[arg(long, env = "EVENTOPS_KAFKA_USERNAME")]
    pub kafka_username: Option<String>,

    /// Password of the SASL user.
    #[arg(long, env = "EVENTOPS_KAFKA_PASSWORD", hide_env_values = true)]
    pub kafka_password: Option<String>,

    /// Extra librdkafka client properties (`key=value`, repeatable), e.g.
    /// `ssl.ca.location=/etc/kafka/ca.crt`.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka_properties: Vec<(String, String)>,

    /// Kafka bootstrap servers as worker pods reach them, when that differs from
    /// --kafka-bootstrap (for example an in-cluster Service name).
    #[arg(long, env = "EVENTOPS_WORKER_KAFKA_BOOTSTRAP")]
    pub worker_kafka_bootstrap: Option<String>,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "EVENTOPS_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// How often an unchanged resource is compared with Kafka again, correcting changes
    /// made behind the operator's back (`30s`, `5m`).
    #[arg(long, env = "EVENTOPS_RESYNC_INTERVAL", default_value = "60s")]
    pub resync_interval: kube::core::Duration,

    /// Reconciles each controller (EventTopic, ConsumerGroup, Redrive, Replay) runs at
    /// once. Each one in flight holds an HTTP connection to the API server (with its TLS
    /// buffers), so this bounds the operator's memory as much as its load on the API
    /// server and Kafka: unbounded, 1,000 objects applied at once opened over 1,200.
    /// 0 sets no bound.
    #[arg(long, env = "EVENTOPS_MAX_CONCURRENT_RECONCILES", default_value_t = DEFAULT_MAX_CONCURRENT_RECONCILES)]
    pub max_concurrent_reconciles: u16,

    /// How often the autoscaler measures the lag of every ConsumerGroup and decides
    /// their replicas. One cycle costs the same Kafka requests however many groups
    /// there are.
    #[arg(long, env = "EVENTOPS_AUTOSCALE_INTERVAL", default_value = "1s")]
    pub autoscale_interval: kube::core::Duration,

    /// Regular expression EventTopic topic names are expected to match, reported in each
    /// EventTopic's `NamingPolicy` condition (not enforced). Empty turns the policy off.
    #[arg(long, env = "EVENTOPS_TOPIC_NAMING_PATTERN", default_value = DEFAULT_TOPIC_NAMING_PATTERN)]
    pub topic_naming_pattern: String,

    /// Namespace ownership policy: the Kafka topic-name and group-id prefixes a namespace
    /// may own, `NAMESPACE=PREFIX[,PREFIX...]` (repeatable; `;` separates entries in the
    /// environment variable), e.g. `team-checkout=orders.,checkout.`. `*` stands for every
    /// namespace not listed. An EventTopic or ConsumerGroup naming something else is
    /// refused (`Ready=False`, reason `NotPermitted`). None given: permissive, every
    /// namespace may own every name.
    #[arg(
        long = "namespace-prefixes",
        env = "EVENTOPS_NAMESPACE_PREFIXES",
        value_name = "NAMESPACE=PREFIX,...",
        value_delimiter = ';',
        value_parser = crate::policy::parse_entry
    )]
    pub namespace_prefixes: Vec<(String, Vec<String>)>,
}

impl RunConfig {
    /// A configuration for `bootstrap` with every other setting at its default.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            kafka_bootstrap: bootstrap.into(),
            kafka_security_protocol: None,
            kafka_sasl_mechanism: "SCRAM-SHA-512".into(),
            kafka_username: None,
            kafka_password: None,
            kafka_properties: Vec::new(),
            worker_kafka_bootstrap: None,
            namespace: None,
            resync_interval: std::time::Duration::from_secs(60).into(),
            autoscale_interval: std::time::Duration::from_secs(1).into(),
            max_concurrent_reconciles: DEFAULT_MAX_CONCURRENT_RECONCILES,
            topic_naming_pattern: DEFAULT_TOPIC_NAMING_PATTERN.into(),
            namespace_prefixes: Vec::new(),
        }
    }

    /// The namespace ownership policy (permissive when no prefixes are given); an error
    /// naming `--namespace-prefixes` when two namespaces are given the same prefix.
    pub fn namespace_policy(&self) -> anyhow::Result<crate::policy::NamespacePolicy> {
        crate::policy::NamespacePolicy::new(self.namespace_prefixes.iter().cloned())
            .map_err(|e| anyhow::anyhow!("--namespace-prefixes: {e}"))
    }

    /// The naming policy, `None` when turned off.
    pub fn topic_naming(&self) -> anyhow::Result<Option<regex::Regex>> {
        if self.topic_naming_pattern.is_empty() {
            return Ok(None);
        }
        let re = regex::Regex::new(&self.topic_naming_pattern).map_err(|e| {
            anyhow::anyhow!("--topic-naming-pattern is not a valid regular expression: {e}")
        })?;
        Ok(Some(re))
    }

    /// The librdkafka properties these settings amount to.
    pub fn kafka_settings(&self) -> anyhow::Result<KafkaSettings> {
        let mut p = BTreeMap::new();
        p.insert(
            "bootstrap.servers".to_string(),
            self.kafka_bootstrap.clone(),
        );
        let protocol = self.kafka_security_protocol.clone().unwrap_or_else(|| {
            if self.kafka_username.is_some() {
                "SASL_PLAINTEXT"
            } else {
                "PLAINTEXT"
            }
            .into()
        });
        if protocol.starts_with("SASL") {
            let (Some(user), Some(password)) = (&self.kafka_username, &self.kafka_password) else {
                bail!(
                    "--kafka-security-protocol {protocol} needs --kafka-username and --kafka-password \
                     (or EVENTOPS_KAFKA_USERNAME and EVENTOPS_KAFKA_PASSWORD)"
                );
            };
            p.insert("sasl.mechanism".into(), self.kafka_sasl_mechanism.clone());
            p.insert("sasl.username".into(), user.clone());
            p.insert("sasl.password".into(), password.clone());
        }
        p.insert("security.protocol".into(), protocol);
        p.extend(self.kafka_properties.iter().cloned());
        Ok(KafkaSettings { properties: p })
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_user_implies_sasl_plaintext() {
        let mut c = RunConfig::new("k:9092");
        c.kafka_username = Some("op".into());
        c.kafka_password = Some("pw".into());
        let p = c.kafka_settings().unwrap().properties;
        assert_eq!(p["security.protocol"], "SASL_PLAINTEXT");
        assert_eq!(p["sasl.username"], "op");
        assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-512");
    }

    #[test]
    fn sasl_without_credentials_is_an_error_naming_the_flags() {
        let mut c = RunConfig::new("k:9092");
        c.kafka_security_protocol = Some("SASL_SSL".into());
        let err = c.kafka_settings().unwrap_err().to_string();
        assert!(err.contains("--kafka-username"), "{err}");
    }

    #[test]
    fn namespace_prefixes_come_from_flags_or_the_environment() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: RunConfig,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "op",
            "--kafka-bootstrap=k:9092",
            "--namespace-prefixes=team-a=orders.,checkout.",
            "--namespace-prefixes",
            "team-b=billing.;*=sandbox.",
        ])
        .unwrap();
        let policy = cli.config.namespace_policy().unwrap();
        assert!(!policy.is_permissive());
        assert_eq!(
            policy.prefixes_of("team-a").unwrap(),
            ["orders.".to_string(), "checkout.".into()]
        );
        assert_eq!(
            policy.prefixes_of("team-b").unwrap(),
            ["billing.".to_string()]
        );
        assert_eq!(
            policy.prefixes_of("other").unwrap(),
            ["sandbox.".to_string()]
        );
        let err = <Cli as clap::Parser>::try_parse_from([
            "op",
            "--kafka-bootstrap=k:9092",
            "--namespace-prefixes=team-a",
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("NAMESPACE=PREFIX"), "{err}");
        assert!(
            RunConfig::new("k:9092")
                .namespace_policy()
                .unwrap()
                .is_permissive()
        );
    }

    #[test]
    fn extra_properties_pass_through() {
        let mut c = RunConfig::new("k:9092");
        c.kafka_properties = vec![parse_key_value("ssl.ca.location=/ca.pem").unwrap()];
        let p = c.kafka_settings().unwrap().properties;
        assert_eq!(p["ssl.ca.location"], "/ca.pem");
        assert_eq!(p["security.protocol"], "PLAINTEXT");
        assert!(parse_key_value("novalue").is_err());
    }
}
