//! Pure steps of the EventTopic reconciler: validate the spec against the other
//! EventTopics and the namespace policy ([`validate`]), then build from Kafka's state of
//! each topic what one pass claims and changes ([`build`]). No I/O here.

use std::collections::{BTreeMap, BTreeSet};

use eventops_crds::{ADOPT_ANNOTATION, EventTopic, TOPIC_NAME_MAX_LEN, annotation_is_true};
use kube::ResourceExt;

use super::NAMING_POLICY;
use crate::conditions::{self, Observed, READY};
use crate::kafka::native::ConfigOp;
use crate::kafka::{NewTopicSpec, TopicState};
use crate::policy::NamespacePolicy;

/// A topic the spec asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTopic {
    /// Which spec field this topic comes from, for messages (`spec` or `spec.deadLetter`).
    pub field: &'static str,
    /// Kafka topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Replication factor; `None` leaves it to the broker.
    pub replication_factor: Option<i32>,
    /// Topic-level configs.
    pub configs: BTreeMap<String, String>,
}

/// A spec the API server let through but that cannot become a topic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Validate and build: the main topic and, when enabled, its dead-letter topic.
///
/// The CRD schema already rejects most bad input; this re-checks what it cannot know
/// (names derived from metadata.name) so a bad object gets a condition, not a panic.
pub fn desired_topics(et: &EventTopic) -> Result<Vec<DesiredTopic>, Invalid> {
    let name = et.kafka_topic_name();
    check_topic_name("spec.topicName (or metadata.name)", name)?;
    check_configs("spec.config", &et.spec.config)?;
    check_configs("spec.deadLetter.config", &et.spec.dead_letter.config)?;
    let main = DesiredTopic {
        field: "spec",
        name: name.to_string(),
        partitions: et.spec.partitions,
        replication_factor: et.spec.replication_factor,
        configs: et.spec.config.clone(),
    };
    let mut topics = vec![main];
    if let Some(dlt) = et.dead_letter_topic_name() {
        check_topic_name("spec.deadLetter.topicName", &dlt)?;
        if dlt == name {
            return Err(Invalid(format!(
                "spec.deadLetter.topicName is {dlt:?}, the topic itself: choose another name"
            )));
        }
        // A dead-letter record keeps its partition number, so the dead-letter topic needs
        // at least as many partitions as its source.
        topics.push(DesiredTopic {
            field: "spec.deadLetter",
            name: dlt,
            partitions: et.spec.partitions,
            replication_factor: et.spec.replication_factor,
            configs: et.spec.dead_letter.config.clone(),
        });
    }
    for (retry, delay) in et
        .retry_topic_names()
        .into_iter()
        .zip(&et.spec.retry.delays)
    {
        check_topic_name("spec.retry.delays", &retry)?;
        // Retried records keep their partition number too.
        topics.push(DesiredTopic {
            field: "spec.retry",
            name: retry,
            partitions: et.spec.partitions,
            replication_factor: et.spec.replication_factor,
            // A retry topic only holds records until they are retried.
            configs: BTreeMap::from([(
                "retention.ms".to_string(),
                retry_retention_ms(&delay.0).to_string(),
            )]),
        });
    }
    Ok(topics)
}

/// Why a pass stops before it changes anything in Kafka: the Ready condition's reason
/// and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `InvalidSpec`, `NotPermitted`, `ResourceConflict` or `TopicExists`.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl Refused {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// Validate: the topics `et` asks for, when the spec can become topics, the namespace
/// policy lets it own every one of them, and no other of `all` (the cached EventTopics)
/// keeps one of them (see [`conflict`]). Nothing in Kafka is looked at before this says
/// yes.
pub fn validate<'a>(
    et: &EventTopic,
    all: impl IntoIterator<Item = &'a EventTopic>,
    policy: &NamespacePolicy,
) -> Result<Vec<DesiredTopic>, Refused> {
    let topics = desired_topics(et).map_err(|invalid| Refused::new("InvalidSpec", invalid.0))?;
    let ns = et.namespace().unwrap_or_default();
    let outside = topics
        .iter()
        .find_map(|t| policy.check(&ns, name_field(t), &t.name).err());
    if let Some(message) = outside {
        return Err(Refused::new("NotPermitted", message));
    }
    if let Some(message) = conflict(et, all, |other| permitted(other, policy)) {
        return Err(Refused::new("ResourceConflict", message));
    }
    Ok(topics)
}

/// Whether the namespace policy lets `et` own every Kafka topic it asks for.
fn permitted(et: &EventTopic, policy: &NamespacePolicy) -> bool {
    let ns = et.namespace().unwrap_or_default();
    desired_topics(et).is_ok_and(|topics| {
        topics
            .iter()
            .all(|t| policy.check(&ns, name_field(t), &t.name).is_ok())
    })
}

/// What one pass does in Kafka, decided from Kafka's state of each topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    /// The topics this EventTopic managed before this pass, and the config keys it set
    /// on each (see [`managed`]).
    pub before: BTreeMap<String, BTreeSet<String>>,
    /// `before` with the topics about to be created or adopted and the config keys about
    /// to be set: recorded in status before Kafka is touched, when it differs.
    pub claim: BTreeMap<String, BTreeSet<String>>,
    /// Whether a change needed now was made outside EventOps (see [`drifted_if_changed`]).
    pub drift: bool,
    /// Each desired topic, in the spec's order: the main topic first.
    pub topics: Vec<TopicBuild>,
}

/// One topic of a [`Build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicBuild {
    /// What the spec asks for.
    pub desired: DesiredTopic,
    /// What Kafka has (`None`: no such topic).
    pub actual: Option<TopicState>,
    /// The config keys that are this EventTopic's once Kafka matches (see
    /// [`claimed_keys`]).
    pub keys: BTreeSet<String>,
    /// What to change.
    pub plan: Plan,
}

/// Build: from the validated `topics` and Kafka's state of each (`actual`, in the same
/// order), what this pass claims and changes. No topic is touched unless every one of
/// them is this EventTopic's to touch: one Kafka has that it neither manages nor may
/// adopt refuses the pass (`TopicExists`).
pub fn build(
    et: &EventTopic,
    topics: Vec<DesiredTopic>,
    actual: Vec<Option<TopicState>>,
) -> Result<Build, Refused> {
    let before = managed(et);
    let adopt = annotation_is_true(&et.metadata, ADOPT_ANNOTATION);
    for (desired, state) in topics.iter().zip(&actual) {
        if state.is_some() && !before.contains_key(&desired.name) && !adopt {
            return Err(Refused::new("TopicExists", topic_exists(desired)));
        }
    }
    let none = BTreeSet::new();
    let mut claim = before.clone();
    let topics: Vec<TopicBuild> = topics
        .into_iter()
        .zip(actual)
        .map(|(desired, actual)| {
            let set_before = before.get(&desired.name);
            let keys = claimed_keys(&desired, actual.as_ref(), set_before);
            let plan = plan(&desired, actual.as_ref(), set_before.unwrap_or(&none));
            let entry = claim.entry(desired.name.clone()).or_default();
            entry.extend(keys.iter().cloned());
            TopicBuild {
                desired,
                actual,
                keys,
                plan,
            }
        })
        .collect();
    Ok(Build {
        before,
        claim,
        drift: drifted_if_changed(et),
        topics,
    })
}

/// Whether a change needed now was made outside EventOps: Kafka matched this very
/// generation of the spec before.
pub fn drifted_if_changed(et: &EventTopic) -> bool {
    let Some(status) = &et.status else {
        return false;
    };
    status.observed_generation == et.metadata.generation
        && conditions::find(&status.conditions, READY).is_some_and(|c| c.status == "True")
}

/// Retention of a retry topic: a day beyond its delay, so records waiting out the delay
/// survive a consumer outage of up to a day.
fn retry_retention_ms(delay: &str) -> u64 {
    let (n, unit) = delay.split_at(delay.len().saturating_sub(1));
    let n: u64 = n.parse().unwrap_or(0);
    let secs = match unit {
        "h" => n * 3600,
        "m" => n * 60,
        _ => n,
    };
    (secs + 24 * 3600) * 1000
}

/// If another EventTopic keeps one of `mine`'s Kafka topics, the message that says which.
///
/// The EventTopic that manages a topic (lists it in `status.managedTopics`) keeps it:
/// no other takes it over, however old, adoption annotation or not. Between EventTopics
/// of which neither manages it, or both do (two first reconciles racing), the oldest
/// wins, ties broken by namespace and name, so the answer is the same whichever of the
/// two is reconciled first.
///
/// Only EventTopics for which `may_own` holds (the namespace policy lets them own their
/// names) count: one the policy refuses cannot keep a name from its owner.
pub fn conflict<'a>(
    mine: &EventTopic,
    others: impl IntoIterator<Item = &'a EventTopic>,
    may_own: impl Fn(&EventTopic) -> bool,
) -> Option<String> {
    let my_topics = topic_names(mine);
    let my_managed = managed(mine);
    let key = |et: &EventTopic| {
        (
            et.metadata.creation_timestamp.clone().map(|t| t.0),
            et.metadata.namespace.clone(),
            et.metadata.name.clone(),
        )
    };
    others
        .into_iter()
        .filter(|other| other.metadata.uid != mine.metadata.uid)
        .filter(|other| other.metadata.deletion_timestamp.is_none())
        .filter(|other| may_own(other))
        .find_map(|other| {
            let their_managed = managed(other);
            let older = key(other) < key(mine);
            topic_names(other)
                .into_iter()
                .filter(|t| my_topics.contains(t))
                .find_map(|shared| {
                    let theirs = their_managed.contains_key(&shared);
                    let ours = my_managed.contains_key(&shared);
                    let why = match (theirs, ours) {
                        (true, false) => "already managed by",
                        (false, true) => return None,
                        _ if older => "also asked for by",
                        _ => return None,
                    };
                    Some(format!(
                        "Kafka topic {shared} is {why} EventTopic {}/{}, which keeps it: choose \
                         another {}",
                        other.metadata.namespace.as_deref().unwrap_or_default(),
                        other.metadata.name.as_deref().unwrap_or_default(),
                        field_naming(mine, &shared),
                    ))
                })
        })
}

/// The spec field that gives `mine` the Kafka topic `topic`, for messages.
fn field_naming(mine: &EventTopic, topic: &str) -> &'static str {
    if topic == mine.kafka_topic_name() {
        "spec.topicName"
    } else if mine.dead_letter_topic_name().as_deref() == Some(topic) {
        "spec.deadLetter.topicName"
    } else {
        "spec.retry.delays"
    }
}

/// The Kafka topics `mine` manages that no other live EventTopic asks for: the ones
/// deleting `mine` with `deletionPolicy: Delete` may delete. A topic it only asks for
/// (refused, or never created) is never among them.
pub fn deletable<'a>(
    mine: &EventTopic,
    others: impl IntoIterator<Item = &'a EventTopic>,
) -> Vec<String> {
    let asked: BTreeSet<String> = others
        .into_iter()
        .filter(|other| other.metadata.uid != mine.metadata.uid)
        .filter(|other| other.metadata.deletion_timestamp.is_none())
        .flat_map(topic_names)
        .collect();
    managed(mine)
        .into_keys()
        .filter(|t| !asked.contains(t))
        .collect()
}

/// The Kafka topics `et` manages and the config keys it set on each, from
/// `status.managedTopics`. A status written before that record existed lists none; then
/// the topics it reports count as its own (unless it reported `ResourceConflict`), with
/// the configs its spec names, which is what that version managed.
pub fn managed(et: &EventTopic) -> BTreeMap<String, BTreeSet<String>> {
    let Some(status) = &et.status else {
        return BTreeMap::new();
    };
    if let Some(list) = &status.managed_topics {
        return list
            .iter()
            .map(|m| (m.name.clone(), m.configs.iter().cloned().collect()))
            .collect();
    }
    // That version took over whatever topic its spec named, so the names its status
    // reports are its own, in sync or not, except when it reported that an older
    // EventTopic had them.
    let lost = crate::conditions::find(&status.conditions, crate::conditions::READY)
        .is_some_and(|c| c.status != "True" && c.reason == "ResourceConflict");
    if lost {
        return BTreeMap::new();
    }
    let keys = |c: &BTreeMap<String, String>| c.keys().cloned().collect::<BTreeSet<_>>();
    let mut topics = BTreeMap::new();
    if let Some(name) = &status.topic_name {
        topics.insert(name.clone(), keys(&et.spec.config));
    }
    if let Some(dlt) = &status.dead_letter_topic {
        topics.insert(dlt.clone(), keys(&et.spec.dead_letter.config));
    }
    for retry in &status.retry_topics {
        topics.insert(retry.clone(), BTreeSet::from(["retention.ms".to_string()]));
    }
    topics
}

/// The config keys of `desired` that are this EventTopic's to manage once Kafka matches
/// the spec: on a topic it creates, all of them; on an existing one, those it managed
/// before and those the topic does not have yet. A key the topic already had (an
/// administrator's, on an adopted topic) stays the administrator's: the spec may set its
/// value, but dropping it from the spec leaves it, never deletes it.
pub fn claimed_keys(
    desired: &DesiredTopic,
    actual: Option<&TopicState>,
    set_before: Option<&BTreeSet<String>>,
) -> BTreeSet<String> {
    desired
        .configs
        .keys()
        .filter(|k| match actual {
            None => true,
            Some(actual) => {
                set_before.is_some_and(|s| s.contains(*k)) || !actual.configs.contains_key(*k)
            }
        })
        .cloned()
        .collect()
}

/// The `NamingPolicy` condition for a topic name, or `None` when no policy is set.
pub fn naming(topic: &str, policy: Option<&regex::Regex>) -> Option<Observed> {
    let policy = policy?;
    Some(if policy.is_match(topic) {
        Observed::new(
            NAMING_POLICY,
            true,
            "Compliant",
            format!("{topic} follows the naming policy"),
        )
    } else {
        Observed::new(
            NAMING_POLICY,
            false,
            "NonCompliant",
            format!(
                "topic name {topic} does not follow the naming policy <domain>.<aggregate>.<past-tense-verb> \
                 (pattern {}), e.g. orders.order.placed: set spec.topicName",
                policy.as_str()
            ),
        )
    })
}

/// Every Kafka topic an EventTopic asks for (main, dead-letter, retry).
pub fn topic_names(et: &EventTopic) -> Vec<String> {
    let mut names = vec![et.kafka_topic_name().to_string()];
    names.extend(et.dead_letter_topic_name());
    names.extend(et.retry_topic_names());
    names
}

fn check_topic_name(field: &str, name: &str) -> Result<(), Invalid> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty()
        || name.len() > TOPIC_NAME_MAX_LEN
        || !valid_chars
        || name == "."
        || name == ".."
        || name.starts_with("__")
    {
        return Err(Invalid(format!(
            "{field} {name:?} is not a valid Kafka topic name: use 1 to {TOPIC_NAME_MAX_LEN} of a-z, A-Z, 0-9, '.', '_', '-', not starting with '__' (Kafka's internal topics)"
        )));
    }
    Ok(())
}

/// One change to make in Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create the topic.
    Create(NewTopicSpec),
    /// Raise the partition count.
    AddPartitions {
        /// Topic name.
        topic: String,
        /// New total partition count.
        to: i32,
    },
    /// Set and remove these topic-level configs, leaving every other config as it is.
    AlterConfigs {
        /// Topic name.
        topic: String,
        /// The changes.
        ops: Vec<ConfigOp>,
        /// What changes, for the Event.
        changed: Vec<String>,
    },
}

/// What to do about one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Changes to apply, in order; empty when Kafka already matches.
    Apply(Vec<Step>),
    /// Kafka cannot do what the spec asks; change nothing and say which field.
    NotSupported(String),
}

/// Diff: what turns `actual` (None: no such topic) into `desired`. `set_before` are the
/// config keys this EventTopic set on the topic before: of the configs the spec does not
/// name, only those are removed; the others (an administrator's) are left.
pub fn plan(
    desired: &DesiredTopic,
    actual: Option<&TopicState>,
    set_before: &BTreeSet<String>,
) -> Plan {
    let Some(actual) = actual else {
        return Plan::Apply(vec![Step::Create(NewTopicSpec {
            name: desired.name.clone(),
            partitions: desired.partitions,
            replication_factor: desired.replication_factor,
            configs: desired.configs.clone(),
        })]);
    };
    let field = desired.field;
    if actual.partitions > desired.partitions {
        return Plan::NotSupported(format!(
            "{field}.partitions is {} but topic {} has {} partitions in Kafka, which cannot remove partitions: set {field}.partitions to {} or more",
            desired.partitions, desired.name, actual.partitions, actual.partitions
        ));
    }
    if let Some(rf) = desired.replication_factor
        && rf != actual.replication_factor
    {
        return Plan::NotSupported(format!(
            "spec.replicationFactor is {rf} but topic {} has replication factor {} in Kafka, which cannot change it in place: set spec.replicationFactor to {}",
            desired.name, actual.replication_factor, actual.replication_factor
        ));
    }
    let mut steps = Vec::new();
    if desired.partitions > actual.partitions {
        steps.push(Step::AddPartitions {
            topic: desired.name.clone(),
            to: desired.partitions,
        });
    }
    let ops = config_ops(&actual.configs, &desired.configs, set_before);
    if !ops.is_empty() {
        let changed = ops
            .iter()
            .map(|op| match op {
                ConfigOp::Set(k, v) => format!("{k}={v}"),
                ConfigOp::Delete(k) => format!("-{k}"),
            })
            .collect();
        steps.push(Step::AlterConfigs {
            topic: desired.name.clone(),
            ops,
            changed,
        });
    }
    Plan::Apply(steps)
}

/// Sets for what the spec names and Kafka lacks or has otherwise; deletes for what this
/// EventTopic set before, the spec no longer names, and Kafka still has.
fn config_ops(
    actual: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
    set_before: &BTreeSet<String>,
) -> Vec<ConfigOp> {
    let set = desired
        .iter()
        .filter(|(k, v)| actual.get(*k) != Some(v))
        .map(|(k, v)| ConfigOp::Set(k.clone(), v.clone()));
    let removed = set_before
        .iter()
        .filter(|k| !desired.contains_key(*k) && actual.contains_key(*k))
        .map(|k| ConfigOp::Delete(k.clone()));
    set.chain(removed).collect()
}

/// The spec field a topic's name comes from, for messages.
pub fn name_field(topic: &DesiredTopic) -> &'static str {
    match topic.field {
        "spec.deadLetter" => "spec.deadLetter.topicName",
        "spec.retry" => "spec.retry.delays",
        _ => "spec.topicName",
    }
}

/// The spec field a topic's configs come from, for messages.
pub fn config_field(topic: &DesiredTopic) -> &'static str {
    match topic.field {
        "spec.deadLetter" => "spec.deadLetter.config",
        "spec.retry" => "spec.retry",
        _ => "spec.config",
    }
}

/// The message for a topic that exists in Kafka but that this EventTopic does not
/// manage and may not adopt.
pub fn topic_exists(topic: &DesiredTopic) -> String {
    let field = name_field(topic);
    format!(
        "Kafka topic {} ({field}) exists but no EventTopic manages it, so EventOps leaves it alone. \
         To manage it with this EventTopic (configs named in the spec are set, others kept), \
         annotate the EventTopic {ADOPT_ANNOTATION}=\"true\"; otherwise choose another {field}",
        topic.name
    )
}

/// Obvious mistakes in topic configs, found before asking Kafka: a key that cannot be a
/// Kafka config name, or a value that cannot be right for a well-known key. Everything
/// else is left to the broker, whose own refusal names the key.
pub fn check_configs(field: &str, configs: &BTreeMap<String, String>) -> Result<(), Invalid> {
    for (k, v) in configs {
        let at = || format!("{field}[{k:?}]");
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.')
        {
            return Err(Invalid(format!(
                "{} is not a Kafka topic config name (lower-case words joined by '.', e.g. retention.ms)",
                at()
            )));
        }
        let bad = |expected: &str| {
            Err(Invalid(format!(
                "{}: {k}: {v} is not valid: {expected}",
                at()
            )))
        };
        match k.as_str() {
            "cleanup.policy" => {
                let ok = v
                    .split(',')
                    .all(|p| matches!(p.trim(), "delete" | "compact"));
                if !ok || v.trim().is_empty() {
                    return bad("use delete, compact or compact,delete");
                }
            }
            "unclean.leader.election.enable" | "preallocate" | "remote.storage.enable"
                if v != "true" && v != "false" =>
            {
                return bad("use true or false");
            }
            "min.insync.replicas" if !v.parse::<i32>().is_ok_and(|n| n >= 1) => {
                return bad("use a whole number of 1 or more");
            }
            // Ranges differ by key (-1 is "no limit" for retention.ms, -2 "as
            // retention.ms" for local.retention.ms): Kafka checks those.
            _ if (k.ends_with(".ms") || k.ends_with(".bytes"))
                && v.trim().parse::<i64>().is_err() =>
            {
                return bad("use a whole number, quoted (\"604800000\")");
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventops_crds::EventTopicSpec;

    fn topic(name: &str, partitions: i32) -> EventTopic {
        EventTopic::new(
            name,
            EventTopicSpec {
                partitions,
                ..Default::default()
            },
        )
    }

    fn configs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn state(partitions: i32, rf: i32, cfg: &[(&str, &str)]) -> TopicState {
        TopicState {
            partitions,
            replication_factor: rf,
            configs: configs(cfg),
        }
    }

    #[test]
    fn topic_and_dead_letter_topic_by_default() {
        let topics = desired_topics(&topic("orders.order.placed", 6)).unwrap();
        let names: Vec<_> = topics
            .iter()
            .map(|t| (t.name.as_str(), t.partitions))
            .collect();
        assert_eq!(
            names,
            [("orders.order.placed", 6), ("orders.order.placed.DLT", 6)]
        );
    }

    #[test]
    fn topic_name_overrides_metadata_name_and_dead_letter_can_be_off() {
        let mut et = topic("k8s-name", 1);
        et.spec.topic_name = Some("orders.order.placed".into());
        et.spec.dead_letter.enabled = false;
        let topics = desired_topics(&et).unwrap();
        assert_eq!(topics.len(), 1);
        assert_eq!(topics[0].name, "orders.order.placed");
    }

    #[test]
    fn invalid_names_name_the_field() {
        let mut et = topic("ok", 1);
        et.spec.topic_name = Some("has space".into());
        let err = desired_topics(&et).unwrap_err();
        assert!(err.0.contains("spec.topicName"), "{err}");

        let mut et = topic("ok", 1);
        et.spec.topic_name = Some("__consumer_offsets".into());
        let err = desired_topics(&et).unwrap_err();
        assert!(err.0.contains("'__'"), "{err}");

        let mut et = topic("ok", 1);
        et.spec.dead_letter.topic_name = Some("ok".into());
        let err = desired_topics(&et).unwrap_err();
        assert!(err.0.contains("spec.deadLetter.topicName"), "{err}");
    }

    #[test]
    fn missing_topic_is_created_with_its_configs() {
        let mut et = topic("t", 3);
        et.spec.replication_factor = Some(1);
        et.spec.config = configs(&[("retention.ms", "1000")]);
        let desired = &desired_topics(&et).unwrap()[0];
        assert_eq!(
            plan(desired, None, &BTreeSet::new()),
            Plan::Apply(vec![Step::Create(NewTopicSpec {
                name: "t".into(),
                partitions: 3,
                replication_factor: Some(1),
                configs: configs(&[("retention.ms", "1000")]),
            })])
        );
    }

    #[test]
    fn matching_topic_needs_nothing() {
        let mut et = topic("t", 3);
        et.spec.config = configs(&[("retention.ms", "1000")]);
        let desired = &desired_topics(&et).unwrap()[0];
        let actual = state(3, 1, &[("retention.ms", "1000")]);
        assert_eq!(
            plan(desired, Some(&actual), &BTreeSet::new()),
            Plan::Apply(vec![])
        );
    }

    #[test]
    fn partitions_grow_and_only_configs_this_event_topic_set_are_removed() {
        let mut et = topic("t", 6);
        et.spec.config = configs(&[("retention.ms", "2000")]);
        let desired = &desired_topics(&et).unwrap()[0];
        let actual = state(
            3,
            1,
            &[
                ("retention.ms", "1000"),
                ("segment.ms", "60000"),
                ("cleanup.policy", "compact"),
            ],
        );
        // The EventTopic set segment.ms before; cleanup.policy is an administrator's.
        let set_before = BTreeSet::from(["retention.ms".into(), "segment.ms".into()]);
        assert_eq!(
            plan(desired, Some(&actual), &set_before),
            Plan::Apply(vec![
                Step::AddPartitions {
                    topic: "t".into(),
                    to: 6
                },
                Step::AlterConfigs {
                    topic: "t".into(),
                    ops: vec![
                        ConfigOp::Set("retention.ms".into(), "2000".into()),
                        ConfigOp::Delete("segment.ms".into()),
                    ],
                    changed: vec!["retention.ms=2000".into(), "-segment.ms".into()],
                }
            ])
        );
        // Nothing the spec names differs and nothing it set is left: no change.
        let actual = state(
            6,
            1,
            &[("retention.ms", "2000"), ("cleanup.policy", "compact")],
        );
        assert_eq!(
            plan(desired, Some(&actual), &set_before),
            Plan::Apply(vec![])
        );
    }

    #[test]
    fn obviously_bad_configs_are_refused_naming_key_and_value() {
        for (k, v, expect) in [
            ("Retention.MS", "1", r#"spec.config["Retention.MS"]"#),
            ("cleanup.policy", "banana", "cleanup.policy: banana"),
            ("retention.ms", "a week", "retention.ms: a week"),
            ("min.insync.replicas", "0", "min.insync.replicas: 0"),
            ("preallocate", "yes", "preallocate: yes"),
        ] {
            let err = check_configs("spec.config", &configs(&[(k, v)])).unwrap_err();
            assert!(err.0.contains(expect), "{k}={v}: {err}");
        }
        for (k, v) in [
            ("cleanup.policy", "compact,delete"),
            ("retention.ms", "-1"),
            ("local.retention.ms", "-2"),
            ("retention.msx", "1"),
            ("compression.type", "zstd"),
        ] {
            assert_eq!(
                check_configs("spec.config", &configs(&[(k, v)])),
                Ok(()),
                "{k}={v}"
            );
        }
        let mut et = topic("t", 1);
        et.spec.dead_letter.config = configs(&[("cleanup.policy", "banana")]);
        let err = desired_topics(&et).unwrap_err();
        assert!(
            err.0
                .contains(r#"spec.deadLetter.config["cleanup.policy"]"#),
            "{err}"
        );
    }

    #[test]
    fn topic_exists_names_the_field_and_the_annotation() {
        let mut et = topic("t", 1);
        et.spec.retry.delays = vec![eventops_crds::RetryDelay("30s".into())];
        let topics = desired_topics(&et).unwrap();
        let fields: Vec<_> = topics.iter().map(name_field).collect();
        assert_eq!(
            fields,
            [
                "spec.topicName",
                "spec.deadLetter.topicName",
                "spec.retry.delays"
            ]
        );
        let msg = topic_exists(&topics[1]);
        assert!(
            msg.contains("t.DLT") && msg.contains("eventops.dev/adopt=\"true\""),
            "{msg}"
        );
    }

    #[test]
    fn what_kafka_cannot_do_is_refused_naming_the_field() {
        let desired = &desired_topics(&topic("t", 2)).unwrap()[0];
        let Plan::NotSupported(msg) = plan(desired, Some(&state(4, 1, &[])), &BTreeSet::new())
        else {
            panic!("partition decrease must be refused");
        };
        assert!(
            msg.contains("spec.partitions") && msg.contains("4 or more"),
            "{msg}"
        );

        let mut et = topic("t", 2);
        et.spec.replication_factor = Some(3);
        let desired = &desired_topics(&et).unwrap()[0];
        let Plan::NotSupported(msg) = plan(desired, Some(&state(2, 1, &[])), &BTreeSet::new())
        else {
            panic!("replication factor change must be refused");
        };
        assert!(msg.contains("spec.replicationFactor"), "{msg}");
    }

    #[test]
    fn retry_topics_follow_the_source() {
        let mut et = topic("t", 4);
        et.spec.retry.delays = vec![
            eventops_crds::RetryDelay("30s".into()),
            eventops_crds::RetryDelay("5m".into()),
        ];
        let topics = desired_topics(&et).unwrap();
        let retry: Vec<_> = topics
            .iter()
            .filter(|t| t.field == "spec.retry")
            .map(|t| {
                (
                    t.name.as_str(),
                    t.partitions,
                    t.configs["retention.ms"].as_str(),
                )
            })
            .collect();
        assert_eq!(
            retry,
            [
                ("t.retry-30s", 4, "86430000"),
                ("t.retry-5m", 4, "86700000")
            ]
        );
    }

    fn created(name: &str, ns: &str, uid: &str, at: i64, topic_name: Option<&str>) -> EventTopic {
        let mut et = topic(name, 1);
        et.metadata.namespace = Some(ns.into());
        et.metadata.uid = Some(uid.into());
        et.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(at).unwrap(),
            ));
        et.spec.topic_name = topic_name.map(String::from);
        et
    }

    #[test]
    fn the_oldest_event_topic_owns_a_kafka_topic() {
        let old = created("orders", "a", "1", 100, None);
        let young = created("other", "b", "2", 200, Some("orders"));
        let unrelated = created("payments", "a", "3", 50, None);
        let all = [old.clone(), young.clone(), unrelated];
        assert_eq!(conflict(&old, &all, |_| true), None);
        let msg = conflict(&young, &all, |_| true).unwrap();
        assert!(
            msg.contains("a/orders") && msg.contains("spec.topicName"),
            "{msg}"
        );
    }

    #[test]
    fn dead_letter_names_count_as_owned_topics() {
        let old = created("orders", "a", "1", 100, None);
        let young = created("x", "a", "2", 200, Some("orders.DLT"));
        assert!(conflict(&young, [&old], |_| true).is_some());
    }

    /// `et` with a status that lists `topics` as managed.
    fn managing(mut et: EventTopic, topics: &[&str]) -> EventTopic {
        et.status = Some(eventops_crds::EventTopicStatus {
            managed_topics: Some(
                topics
                    .iter()
                    .map(|t| eventops_crds::ManagedTopic {
                        name: t.to_string(),
                        configs: vec![],
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        et
    }

    #[test]
    fn the_event_topic_managing_a_topic_keeps_it_however_old_the_other() {
        let older = created("orders", "a", "1", 100, None);
        let manager = managing(
            created("x", "b", "2", 200, Some("orders.DLT")),
            &["orders.DLT", "orders.DLT.DLT"],
        );
        let msg = conflict(&older, [&manager], |_| true).unwrap();
        assert!(
            msg.contains("already managed by EventTopic b/x")
                && msg.contains("spec.deadLetter.topicName"),
            "{msg}"
        );
        assert_eq!(conflict(&manager, [&older], |_| true), None);
        // One the namespace policy refuses does not count.
        assert_eq!(conflict(&older, [&manager], |_| false), None);
        // An older manager of the topic keeps it too.
        let older = managing(older, &["orders", "orders.DLT"]);
        assert!(conflict(&manager, [&older], |_| true).is_some());
    }

    #[test]
    fn deleting_deletes_only_managed_topics_no_other_asks_for() {
        let mine = managing(
            created("orders", "a", "1", 100, None),
            &["orders", "orders.DLT"],
        );
        let other = created("x", "b", "2", 200, Some("orders.DLT"));
        assert_eq!(deletable(&mine, [&other]), ["orders"]);
        assert_eq!(deletable(&mine, []), ["orders", "orders.DLT"]);
        // Asked for but never managed (refused, or not created): never deleted.
        let refused = created("y", "c", "3", 300, Some("billing"));
        assert_eq!(deletable(&refused, []), Vec::<String>::new());
    }

    #[test]
    fn an_adopted_topics_own_configs_are_not_claimed() {
        let mut et = topic("t", 1);
        et.spec.config = configs(&[
            ("cleanup.policy", "compact"),
            ("retention.ms", "1000"),
            ("segment.ms", "60000"),
        ]);
        let desired = &desired_topics(&et).unwrap()[0];
        let all: BTreeSet<String> = desired.configs.keys().cloned().collect();
        assert_eq!(claimed_keys(desired, None, None), all, "created: all");
        let had = state(
            1,
            1,
            &[("cleanup.policy", "compact"), ("retention.ms", "-1")],
        );
        assert_eq!(
            claimed_keys(desired, Some(&had), None),
            BTreeSet::from(["segment.ms".to_string()]),
            "adopted: only what the topic did not have"
        );
        let before = BTreeSet::from(["retention.ms".to_string()]);
        assert_eq!(
            claimed_keys(desired, Some(&had), Some(&before)),
            BTreeSet::from(["retention.ms".to_string(), "segment.ms".to_string()]),
            "managed: what it set before stays claimed"
        );
    }

    #[test]
    fn naming_policy_is_reported_not_enforced() {
        let policy = regex::Regex::new(crate::config::DEFAULT_TOPIC_NAMING_PATTERN).unwrap();
        for ok in [
            "orders.order.placed",
            "payments.payment.captured",
            "shipping.parcel.sent",
        ] {
            assert!(naming(ok, Some(&policy)).unwrap().status, "{ok}");
        }
        for bad in [
            "orders",
            "orders.order.place",
            "Orders.Order.Placed",
            "a.b.c.placed",
        ] {
            let c = naming(bad, Some(&policy)).unwrap();
            assert!(!c.status && c.message.contains("spec.topicName"), "{bad}");
        }
        assert_eq!(naming("anything", None), None);
    }

    #[test]
    fn unset_replication_factor_accepts_what_kafka_chose() {
        let desired = &desired_topics(&topic("t", 2)).unwrap()[0];
        assert_eq!(
            plan(desired, Some(&state(2, 3, &[])), &BTreeSet::new()),
            Plan::Apply(vec![])
        );
    }

    #[test]
    fn validation_refuses_before_kafka_is_asked_and_says_why() {
        let policy =
            NamespacePolicy::new([("a".to_string(), vec!["orders.".to_string()])]).unwrap();
        let mine = created("orders.placed", "a", "2", 200, None);
        // Valid, permitted, and nobody else's: the main and dead-letter topics.
        let names = |r: Result<Vec<DesiredTopic>, Refused>| {
            r.map(|t| t.into_iter().map(|t| t.name).collect::<Vec<_>>())
        };
        assert_eq!(
            names(validate(&mine, [&mine], &policy)),
            Ok(vec!["orders.placed".into(), "orders.placed.DLT".into()])
        );
        let reason = |r: Result<Vec<DesiredTopic>, Refused>| r.unwrap_err().reason;
        let invalid = created("bad", "a", "3", 200, Some("__internal"));
        assert_eq!(reason(validate(&invalid, [], &policy)), "InvalidSpec");
        let outside = created("payments.captured", "a", "4", 200, None);
        assert_eq!(reason(validate(&outside, [], &policy)), "NotPermitted");
        let older = created("orders", "a", "1", 100, Some("orders.placed"));
        assert_eq!(
            reason(validate(&mine, [&older, &mine], &policy)),
            "ResourceConflict"
        );
        // One the policy refuses keeps no name from anybody.
        let refused = created("x", "b", "5", 50, Some("orders.placed"));
        assert!(validate(&mine, [&refused], &policy).is_ok());
    }

    #[test]
    fn build_claims_before_it_creates_and_plans_every_topic() {
        let et = created("orders.placed", "a", "1", 100, None);
        let et = EventTopic {
            spec: EventTopicSpec {
                partitions: 2,
                config: configs(&[("retention.ms", "1000")]),
                ..et.spec.clone()
            },
            ..et
        };
        let topics = desired_topics(&et).unwrap();
        let built = build(&et, topics.clone(), vec![None, None]).unwrap();
        assert!(built.before.is_empty());
        assert!(!built.drift);
        let keys = |k: &[&str]| k.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            built.claim,
            BTreeMap::from([
                ("orders.placed".to_string(), keys(&["retention.ms"])),
                ("orders.placed.DLT".to_string(), keys(&[])),
            ])
        );
        assert!(matches!(
            &built.topics[0].plan,
            Plan::Apply(steps) if matches!(steps.as_slice(), [Step::Create(s)] if s.partitions == 2)
        ));
        assert_eq!(built.topics[1].desired.name, "orders.placed.DLT");

        // Kafka has the main topic, which nobody manages: refused, nothing planned.
        let exists = vec![Some(state(2, 1, &[])), None];
        let refused = build(&et, topics.clone(), exists.clone()).unwrap_err();
        assert_eq!(refused.reason, "TopicExists");
        // Adopted when asked: its existing configs stay the administrator's.
        let mut adopting = et.clone();
        adopting
            .annotations_mut()
            .insert(ADOPT_ANNOTATION.into(), "true".into());
        let exists = vec![Some(state(2, 1, &[("retention.ms", "5")])), None];
        let built = build(&adopting, topics, exists).unwrap();
        assert_eq!(built.topics[0].keys, keys(&[]));
        assert!(matches!(
            &built.topics[0].plan,
            Plan::Apply(steps) if matches!(steps.as_slice(), [Step::AlterConfigs { .. }])
        ));
    }

    #[test]
    fn a_change_kafka_needs_for_a_spec_it_matched_before_is_drift() {
        let mut et = topic("orders", 1);
        et.metadata.generation = Some(3);
        assert!(!drifted_if_changed(&et), "never reconciled");
        let ready = |generation: i64, status: &str| eventops_crds::EventTopicStatus {
            observed_generation: Some(generation),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: READY.into(),
                status: status.into(),
                reason: "InSync".into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: Some(generation),
            }],
            ..Default::default()
        };
        et.status = Some(ready(3, "True"));
        assert!(drifted_if_changed(&et));
        et.status = Some(ready(2, "True"));
        assert!(!drifted_if_changed(&et), "a new generation");
        et.status = Some(ready(3, "False"));
        assert!(!drifted_if_changed(&et), "Kafka did not match");
    }
}
