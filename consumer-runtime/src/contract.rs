//! The configuration contract between the operator and worker pods: the environment
//! variables the operator sets on a ConsumerGroup's Deployment, their format, and
//! [`WorkerConfig::from_env`], which reads them. Both sides use these names, so they
//! cannot drift apart.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Kafka `bootstrap.servers`.
pub const KAFKA_BOOTSTRAP: &str = "EVENTOPS_KAFKA_BOOTSTRAP";
/// Kafka `security.protocol` (`SASL_PLAINTEXT`, `SASL_SSL`, ...).
pub const KAFKA_SECURITY_PROTOCOL: &str = "EVENTOPS_KAFKA_SECURITY_PROTOCOL";
/// Kafka `sasl.mechanism` (`SCRAM-SHA-512`).
pub const KAFKA_SASL_MECHANISM: &str = "EVENTOPS_KAFKA_SASL_MECHANISM";
/// The group's own Kafka user (from the group's credentials Secret).
pub const KAFKA_USERNAME: &str = "EVENTOPS_KAFKA_USERNAME";
/// The group's own Kafka password (from the group's credentials Secret).
pub const KAFKA_PASSWORD: &str = "EVENTOPS_KAFKA_PASSWORD";
/// Kafka consumer group id.
pub const GROUP_ID: &str = "EVENTOPS_GROUP_ID";
/// JSON array of [`TopicRoute`]: each consumed topic with its dead-letter and retry topics.
pub const TOPICS: &str = "EVENTOPS_TOPICS";
/// Attempts per record, the first included.
pub const MAX_ATTEMPTS: &str = "EVENTOPS_MAX_ATTEMPTS";
/// Delay before the second attempt, in milliseconds.
pub const BACKOFF_INITIAL_MS: &str = "EVENTOPS_BACKOFF_INITIAL_MS";
/// Longest delay between attempts, in milliseconds.
pub const BACKOFF_MAX_MS: &str = "EVENTOPS_BACKOFF_MAX_MS";
/// Factor each delay grows by.
pub const BACKOFF_MULTIPLIER: &str = "EVENTOPS_BACKOFF_MULTIPLIER";
/// `true` to dead-letter records that cannot be processed, `false` to stop the partition.
pub const DEAD_LETTER: &str = "EVENTOPS_DEAD_LETTER";
/// `None`, `Memory` or `Postgres`.
pub const IDEMPOTENCY: &str = "EVENTOPS_IDEMPOTENCY";
/// Port of `/healthz`, `/readyz` and `/metrics`.
pub const HEALTH_PORT: &str = "EVENTOPS_HEALTH_PORT";

/// The pod's IP, from the downward API (`status.podIP`).
pub const POD_IP: &str = "EVENTOPS_POD_IP";
/// Socket address the health and metrics server binds (`<ip>:<port>`). The operator sets
/// it to `$(EVENTOPS_POD_IP):<HEALTH_PORT>`; when unset the server binds
/// `0.0.0.0:<HEALTH_PORT>`.
pub const HEALTH_ADDR: &str = "EVENTOPS_HEALTH_ADDR";

/// PostgreSQL connection URL of the worker's own database (`postgres://user:pw@host/db`),
/// where the inbox lives; needed when [`IDEMPOTENCY`] is `Postgres`. The conventional
/// `DATABASE_URL`: set by the user, never by the operator (the ConsumerGroup's
/// `template.env` may not name `EVENTOPS_*` variables), typically from a Secret through
/// `valueFrom.secretKeyRef`.
pub const DATABASE_URL: &str = "DATABASE_URL";

/// JSON array of the Kafka topic names the worker's outbox relay may publish to
/// (`ConsumerGroup.spec.outbox.topics`, resolved to topic names). When set, the worker
/// runs the relay (see [`crate::outbox`]); the operator grants the group's Kafka user
/// Write on exactly these topics.
pub const OUTBOX_TOPICS: &str = "EVENTOPS_OUTBOX_TOPICS";
/// PostgreSQL URL of the database holding `eventops_outbox`, from the Secret key
/// `ConsumerGroup.spec.outbox.databaseSecret` names. When unset, the relay uses
/// [`DATABASE_URL`].
pub const OUTBOX_DATABASE_URL: &str = "EVENTOPS_OUTBOX_DATABASE_URL";

/// Port of the health and metrics endpoints when [`HEALTH_PORT`] is not set.
pub const DEFAULT_HEALTH_PORT: u16 = 8080;

/// One consumed topic and where its failed records go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TopicRoute {
    /// The topic consumed.
    pub topic: String,
    /// Its dead-letter topic, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// Its retry topics, in delay order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_topics: Vec<RetryRoute>,
}

/// A retry topic and how long records wait in it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryRoute {
    /// Retry topic name.
    pub topic: String,
    /// Delay before a record in it is retried, in milliseconds.
    pub delay_ms: u64,
}

/// Where duplicate deliveries are recognised.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotency {
    /// Every delivery is processed.
    None,
    /// A bounded in-memory set of recent event ids.
    Memory,
    /// An inbox table in the worker's PostgreSQL database.
    Postgres,
}

/// A worker's configuration as the operator hands it over.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    /// librdkafka client properties: `bootstrap.servers`, security, credentials.
    pub kafka: BTreeMap<String, String>,
    /// Consumer group id.
    pub group_id: String,
    /// Consumed topics with their dead-letter and retry topics.
    pub topics: Vec<TopicRoute>,
    /// Attempts per record.
    pub max_attempts: u32,
    /// First back-off delay.
    pub backoff_initial: Duration,
    /// Longest back-off delay.
    pub backoff_max: Duration,
    /// Back-off growth factor.
    pub backoff_multiplier: f64,
    /// Whether failed records are dead-lettered.
    pub dead_letter: bool,
    /// Idempotency store.
    pub idempotency: Idempotency,
    /// Health and metrics port.
    pub health_port: u16,
    /// Socket address for the health server from [`HEALTH_ADDR`] (`<ip>:<port>`), if set;
    /// otherwise the server binds `0.0.0.0:<health_port>`.
    pub health_addr: Option<String>,
    /// The worker's PostgreSQL URL from [`DATABASE_URL`], if set.
    pub postgres_url: Option<String>,
    /// The outbox relay's settings, when [`OUTBOX_TOPICS`] is set.
    pub outbox: Option<OutboxContract>,
}

/// What the operator tells a worker about its outbox relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxContract {
    /// Kafka topics the relay may publish to; a row for any other topic is refused and
    /// stays in the table (reported, never dropped).
    pub topics: Vec<String>,
    /// The outbox database from [`OUTBOX_DATABASE_URL`], else [`DATABASE_URL`].
    pub database_url: String,
}

/// A missing or malformed variable, named with what it should hold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("environment variable {name}: {problem}")]
pub struct ContractError {
    /// The variable.
    pub name: &'static str,
    /// What is wrong and what it should be.
    pub problem: String,
}

impl WorkerConfig {
    /// Reads the contract from the process environment.
    pub fn from_env() -> Result<Self, ContractError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the contract through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ContractError> {
        let required = |name: &'static str| {
            lookup(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ContractError {
                    name,
                    problem: "is not set; the operator sets it on every worker pod".into(),
                })
        };
        let parsed =
            |name: &'static str, default: &str, what: &str| -> Result<String, ContractError> {
                let v = lookup(name).unwrap_or_else(|| default.to_string());
                if v.is_empty() {
                    return Err(ContractError {
                        name,
                        problem: format!("is empty; expected {what}"),
                    });
                }
                Ok(v)
            };
        let number = |name: &'static str, default: &str| -> Result<u64, ContractError> {
            let v = parsed(name, default, "a whole number")?;
            v.parse().map_err(|_| ContractError {
                name,
                problem: format!("is {v:?}; expected a whole number"),
            })
        };

        let kafka = kafka_properties(&lookup)?;
        let topics_json = required(TOPICS)?;
        let topics: Vec<TopicRoute> =
            serde_json::from_str(&topics_json).map_err(|e| ContractError {
                name: TOPICS,
                problem: format!("is not a JSON array of {{\"topic\": ...}} objects: {e}"),
            })?;
        let multiplier = parsed(BACKOFF_MULTIPLIER, "2", "a number")?;
        let idempotency = match parsed(IDEMPOTENCY, "Memory", "None, Memory or Postgres")?.as_str()
        {
            "None" => Idempotency::None,
            "Memory" => Idempotency::Memory,
            "Postgres" => Idempotency::Postgres,
            other => {
                return Err(ContractError {
                    name: IDEMPOTENCY,
                    problem: format!("is {other:?}; expected None, Memory or Postgres"),
                });
            }
        };
        let dead_letter = match parsed(DEAD_LETTER, "true", "true or false")?.as_str() {
            "true" => true,
            "false" => false,
            other => {
                return Err(ContractError {
                    name: DEAD_LETTER,
                    problem: format!("is {other:?}; expected true or false"),
                });
            }
        };
        let postgres_url = lookup(DATABASE_URL).filter(|v| !v.is_empty());
        let outbox = match lookup(OUTBOX_TOPICS).filter(|v| !v.is_empty()) {
            None => None,
            Some(json) => {
                let topics: Vec<String> =
                    serde_json::from_str(&json).map_err(|e| ContractError {
                        name: OUTBOX_TOPICS,
                        problem: format!("is not a JSON array of topic names: {e}"),
                    })?;
                let database_url = lookup(OUTBOX_DATABASE_URL)
                    .filter(|v| !v.is_empty())
                    .or_else(|| postgres_url.clone())
                    .ok_or_else(|| ContractError {
                        name: OUTBOX_DATABASE_URL,
                        problem: format!(
                            "is not set and neither is {DATABASE_URL}; the outbox relay \
                             needs the database its rows are written to (set \
                             spec.outbox.databaseSecret on the ConsumerGroup)"
                        ),
                    })?;
                Some(OutboxContract {
                    topics,
                    database_url,
                })
            }
        };
        Ok(Self {
            kafka,
            group_id: required(GROUP_ID)?,
            topics,
            max_attempts: number(MAX_ATTEMPTS, "3")? as u32,
            backoff_initial: Duration::from_millis(number(BACKOFF_INITIAL_MS, "200")?),
            backoff_max: Duration::from_millis(number(BACKOFF_MAX_MS, "30000")?),
            backoff_multiplier: multiplier.parse().map_err(|_| ContractError {
                name: BACKOFF_MULTIPLIER,
                problem: format!("is {multiplier:?}; expected a number such as 2.0"),
            })?,
            dead_letter,
            idempotency,
            health_port: number(HEALTH_PORT, &DEFAULT_HEALTH_PORT.to_string())? as u16,
            health_addr: lookup(HEALTH_ADDR).filter(|v| !v.is_empty()),
            postgres_url,
            outbox,
        })
    }
}

/// The librdkafka properties of the `EVENTOPS_KAFKA_*` variables: bootstrap servers,
/// security protocol and SASL credentials. For processes that only publish, such as the
/// standalone outbox relay.
pub fn kafka_properties(
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, ContractError> {
    let required = |name: &'static str| {
        lookup(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ContractError {
                name,
                problem: "is not set; the operator sets it on every worker pod".into(),
            })
    };
    let mut kafka = BTreeMap::new();
    kafka.insert("bootstrap.servers".to_string(), required(KAFKA_BOOTSTRAP)?);
    if let Some(p) = lookup(KAFKA_SECURITY_PROTOCOL) {
        kafka.insert("security.protocol".into(), p);
    }
    if let Some(user) = lookup(KAFKA_USERNAME) {
        kafka.insert("sasl.username".into(), user);
        kafka.insert("sasl.password".into(), required(KAFKA_PASSWORD)?);
        kafka.insert(
            "sasl.mechanism".into(),
            lookup(KAFKA_SASL_MECHANISM).unwrap_or_else(|| "SCRAM-SHA-512".into()),
        );
    }
    Ok(kafka)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const MINIMAL: [(&str, &str); 3] = [
        (KAFKA_BOOTSTRAP, "k:9092"),
        (GROUP_ID, "inventory"),
        (
            TOPICS,
            r#"[{"topic":"orders","deadLetterTopic":"orders.DLT"}]"#,
        ),
    ];

    #[test]
    fn minimal_contract_takes_defaults() {
        let c = WorkerConfig::from_lookup(lookup(&MINIMAL)).unwrap();
        assert_eq!(c.group_id, "inventory");
        assert_eq!(c.topics[0].dead_letter_topic.as_deref(), Some("orders.DLT"));
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.backoff_initial, Duration::from_millis(200));
        assert_eq!(c.idempotency, Idempotency::Memory);
        assert!(c.dead_letter);
        assert_eq!(c.health_port, DEFAULT_HEALTH_PORT);
        assert!(!c.kafka.contains_key("sasl.username"));
        assert_eq!(c.health_addr, None);
        assert_eq!(c.postgres_url, None);
    }

    #[test]
    fn health_address_and_database_url_are_read() {
        let mut vars = MINIMAL.to_vec();
        vars.extend([
            (HEALTH_ADDR, "10.0.0.7:8080"),
            (DATABASE_URL, "postgres://db/x"),
        ]);
        let c = WorkerConfig::from_lookup(lookup(&vars)).unwrap();
        assert_eq!(c.health_addr.as_deref(), Some("10.0.0.7:8080"));
        assert_eq!(c.postgres_url.as_deref(), Some("postgres://db/x"));
    }

    #[test]
    fn the_outbox_runs_only_when_its_topics_are_set_and_falls_back_to_database_url() {
        assert_eq!(
            WorkerConfig::from_lookup(lookup(&MINIMAL)).unwrap().outbox,
            None
        );
        let mut vars = MINIMAL.to_vec();
        vars.push((OUTBOX_TOPICS, r#"["payments.captured"]"#));
        let err = WorkerConfig::from_lookup(lookup(&vars)).unwrap_err();
        assert_eq!(err.name, OUTBOX_DATABASE_URL, "{err}");
        vars.push((DATABASE_URL, "postgres://db/app"));
        let c = WorkerConfig::from_lookup(lookup(&vars)).unwrap();
        let outbox = c.outbox.unwrap();
        assert_eq!(outbox.topics, ["payments.captured"]);
        assert_eq!(outbox.database_url, "postgres://db/app");
        vars.push((OUTBOX_DATABASE_URL, "postgres://db/outbox"));
        let c = WorkerConfig::from_lookup(lookup(&vars)).unwrap();
        assert_eq!(c.outbox.unwrap().database_url, "postgres://db/outbox");
        vars.push((OUTBOX_TOPICS, "payments.captured"));
        vars.retain(|(k, v)| *k != OUTBOX_TOPICS || !v.starts_with('['));
        let err = WorkerConfig::from_lookup(lookup(&vars)).unwrap_err();
        assert_eq!(err.name, OUTBOX_TOPICS, "{err}");
    }

    #[test]
    fn credentials_become_sasl_properties() {
        let mut vars = MINIMAL.to_vec();
        vars.extend([
            (KAFKA_USERNAME, "u"),
            (KAFKA_PASSWORD, "p"),
            (KAFKA_SECURITY_PROTOCOL, "SASL_PLAINTEXT"),
        ]);
        let c = WorkerConfig::from_lookup(lookup(&vars)).unwrap();
        assert_eq!(c.kafka["sasl.username"], "u");
        assert_eq!(c.kafka["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(c.kafka["security.protocol"], "SASL_PLAINTEXT");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: [(&str, &str); 4] = [
            (MAX_ATTEMPTS, "three"),
            (IDEMPOTENCY, "Redis"),
            (TOPICS, "orders"),
            (DEAD_LETTER, "yes"),
        ];
        for (name, value) in cases {
            let mut vars = MINIMAL.to_vec();
            vars.retain(|(k, _)| *k != name);
            vars.push((name, value));
            let err = WorkerConfig::from_lookup(lookup(&vars)).unwrap_err();
            assert_eq!(err.name, name, "{err}");
        }
        let without_group: Vec<_> = MINIMAL
            .iter()
            .copied()
            .filter(|(k, _)| *k != GROUP_ID)
            .collect();
        let err = WorkerConfig::from_lookup(lookup(&without_group)).unwrap_err();
        assert_eq!(err.name, GROUP_ID);
        assert!(err.to_string().contains("is not set"), "{err}");
    }
}
