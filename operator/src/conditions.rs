//! Status conditions, kept the way kstatus, Argo CD and Flux read them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition type that says whether the resource is what its spec asks for.
pub const READY: &str = "Ready";

/// A condition's content, without its timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Condition type.
    pub type_: &'static str,
    /// Whether it holds.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable detail, naming the field to fix when something is wrong.
    pub message: String,
}

impl Observed {
    /// A condition of `type_`.
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A `Ready` condition.
    pub fn ready(status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_: READY,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// kstatus' abnormal-true condition: True, with `Ready`'s reason and message, while
/// `Ready` is False (the operator keeps working towards the spec); absent once `Ready`.
/// kstatus (Flux, `kubectl wait`-style tools) ignores `Ready` and reads a resource
/// without `Reconciling` or `Stalled` as current, so a resource that is not Ready has to
/// say so this way too.
pub const RECONCILING: &str = "Reconciling";

/// `conditions` with `observed` set for `generation`; setting `Ready` also sets or
/// removes [`RECONCILING`]. `lastTransitionTime` moves only when the status flips, so
/// re-observing the same state yields an identical list and no status write.
pub fn set(
    conditions: &[Condition],
    observed: Observed,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let reconciling = (observed.type_ == READY).then(|| {
        (!observed.status).then(|| {
            Observed::new(
                RECONCILING,
                true,
                observed.reason.clone(),
                observed.message.clone(),
            )
        })
    });
    let out = set_one(conditions, observed, generation, now);
    match reconciling {
        Some(Some(r)) => set_one(&out, r, generation, now),
        Some(None) => remove(&out, RECONCILING),
        None => out,
    }
}

fn set_one(
    conditions: &[Condition],
    observed: Observed,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let status = if observed.status { "True" } else { "False" };
    let previous = conditions.iter().find(|c| c.type_ == observed.type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: observed.type_.to_string(),
        status: status.to_string(),
        reason: observed.reason,
        message: observed.message,
        observed_generation: generation,
        last_transition_time,
    };
    let mut out: Vec<Condition> = conditions
        .iter()
        .filter(|c| c.type_ != condition.type_)
        .cloned()
        .collect();
    out.push(condition);
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// `conditions` without the condition of `type_`.
pub fn remove(conditions: &[Condition], type_: &str) -> Vec<Condition> {
    conditions
        .iter()
        .filter(|c| c.type_ != type_)
        .cloned()
        .collect()
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The Kafka ACL the operator's own user needs for `request` (an admin request as the
/// operator names it: `"create ACLs"`, `"create"` a topic, ...): operation and resource,
/// as listed in the README's "Kafka permissions". `None` for requests that need none.
pub fn operator_permission(request: &str) -> Option<&'static str> {
    Some(match request {
        "create ACLs" | "delete ACLs" | "upsert SCRAM credential" | "delete SCRAM credential" => {
            "Alter on the Cluster"
        }
        "describe ACLs" | "describe SCRAM credentials" => {
            "Describe on the Cluster (implied by Alter on the Cluster)"
        }
        "create" => "Create on Topic",
        "delete" => "Delete on Topic",
        "add partitions to" => "Alter on Topic",
        "alter configs of" => "AlterConfigs on Topic",
        "describe configs of" => "DescribeConfigs on Topic (implied by AlterConfigs)",
        "describe" | "list offsets" => "Describe on Topic (implied by Alter, Delete or Read)",
        "read committed offsets" => "Read on Topic __consumer_offsets",
        "describe consumer group" | "list consumer group offsets" => {
            "Describe on Group (implied by Read on Group)"
        }
        "alter consumer group offsets" => "Read on Group",
        _ => return None,
    })
}

/// Whether Kafka's answer `code` means the operator's own user lacks an ACL.
pub fn is_authorization_failure(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::DelegationTokenAuthorizationFailed
    )
}

/// `message` with, when Kafka refused `request` for lack of an ACL, the ACL the
/// operator's Kafka user is missing: the operator's own permissions are the platform
/// team's to fix, not the resource owner's.
pub fn with_permission_hint(
    message: String,
    request: &str,
    code: rdkafka::types::RDKafkaErrorCode,
) -> String {
    match operator_permission(request) {
        Some(acl) if is_authorization_failure(code) => format!(
            "{message}; the operator's Kafka user lacks the ACL \"{acl}\" (see the Kafka \
             permissions in the EventOps chart README)"
        ),
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = set(
            &[],
            Observed::ready(false, "Creating", "a"),
            Some(1),
            at(10),
        );
        assert_eq!(first[0].last_transition_time, Time(at(10)));

        let same = set(
            &first,
            Observed::ready(false, "Other", "b"),
            Some(2),
            at(20),
        );
        assert_eq!(same[0].last_transition_time, Time(at(10)));
        assert_eq!(same[0].reason, "Other");
        assert_eq!(same[0].observed_generation, Some(2));

        let flipped = set(&same, Observed::ready(true, "InSync", "c"), Some(2), at(30));
        assert_eq!(flipped[0].last_transition_time, Time(at(30)));
        assert_eq!(flipped[0].status, "True");
    }

    #[test]
    fn re_observing_the_same_state_changes_nothing() {
        let once = set(&[], Observed::ready(true, "InSync", "ok"), Some(3), at(10));
        let twice = set(
            &once,
            Observed::ready(true, "InSync", "ok"),
            Some(3),
            at(99),
        );
        assert_eq!(once, twice);
    }

    #[test]
    fn reconciling_follows_ready_for_kstatus() {
        let waiting = set(
            &[],
            Observed::ready(false, "TopicNotFound", "waiting"),
            Some(1),
            at(10),
        );
        let r = find(&waiting, RECONCILING).expect("Reconciling while not Ready");
        assert_eq!(
            (r.status.as_str(), r.reason.as_str(), r.message.as_str()),
            ("True", "TopicNotFound", "waiting")
        );
        assert_eq!(r.observed_generation, Some(1));
        let again = set(
            &waiting,
            Observed::ready(false, "TopicNotFound", "waiting"),
            Some(1),
            at(20),
        );
        assert_eq!(again, waiting, "no churn while the state stays");
        let ready = set(
            &waiting,
            Observed::ready(true, "InSync", "ok"),
            Some(1),
            at(30),
        );
        assert_eq!(find(&ready, RECONCILING), None, "gone once Ready");
        assert_eq!(ready.len(), 1);
        let other = set(
            &ready,
            Observed::new("NamingPolicy", false, "R", "m"),
            Some(1),
            at(40),
        );
        assert_eq!(find(&other, RECONCILING), None, "only Ready drives it");
    }

    #[test]
    fn other_condition_types_are_kept() {
        let other = Condition {
            type_: "Stalled".into(),
            status: "False".into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(at(1)),
        };
        let out = set(
            std::slice::from_ref(&other),
            Observed::ready(true, "InSync", ""),
            None,
            at(5),
        );
        assert_eq!(out.len(), 2);
        assert_eq!(find(&out, "Stalled"), Some(&other));
    }
}
