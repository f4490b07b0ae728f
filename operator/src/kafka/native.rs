//! Admin calls that the `rdkafka` crate does not wrap (ACLs, SCRAM credentials, cluster
//! description, consumer groups and their committed offsets), made directly through
//! librdkafka's C API on the operator's existing admin client.
//!
//! Every call is sent from the calling task and answered on one result queue per
//! client, which one thread polls and hands out to the waiting calls (by the id each
//! carries as its opaque): no thread blocks per call. Every C object a call creates is
//! owned by a guard that frees it on drop, so no path (errors included) leaks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka_sys::bindings::*;

/// A failed native admin call.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NativeError {
    /// Kafka (or librdkafka on its behalf) refused the request or one of its items.
    #[error("{op} failed: {code:?}: {message}")]
    Kafka {
        /// What was attempted.
        op: &'static str,
        /// Kafka's error code, or one of librdkafka's local (negative) codes.
        code: RDKafkaErrorCode,
        /// Kafka's or librdkafka's explanation.
        message: String,
    },
    /// No answer within the request timeout; the request may still take effect.
    #[error("{op} timed out")]
    Timeout {
        /// What was attempted.
        op: &'static str,
    },
    /// The request was rejected before being sent (for example a string with a NUL byte).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Kafka answered with something this module cannot represent (for example an ACL
    /// operation newer than librdkafka knows).
    #[error("{op}: unexpected answer: {what}")]
    Unexpected {
        /// What was attempted.
        op: &'static str,
        /// What was unexpected.
        what: String,
    },
    /// The Tokio runtime shut down before the call could run.
    #[error("{op} was cancelled: the runtime is shutting down")]
    Cancelled {
        /// What was attempted.
        op: &'static str,
    },
}

impl NativeError {
    /// A CamelCase reason for a status condition: Kafka's own error name when Kafka
    /// answered, `KafkaUnavailable` when it did not answer in time.
    pub fn reason(&self) -> String {
        match self {
            NativeError::Kafka { code, .. } => format!("{code:?}"),
            NativeError::Timeout { .. } | NativeError::Cancelled { .. } => {
                "KafkaUnavailable".into()
            }
            NativeError::InvalidArgument(_) | NativeError::Unexpected { .. } => "KafkaError".into(),
        }
    }

    /// Whether asking again soon may succeed (Kafka unreachable, a timeout, a leader
    /// moving); otherwise somebody must act first (an ACL missing, a bad request).
    pub fn is_transient(&self) -> bool {
        match self {
            NativeError::Kafka { code, .. } => super::is_transient_code(*code),
            NativeError::Timeout { .. } | NativeError::Cancelled { .. } => true,
            NativeError::InvalidArgument(_) | NativeError::Unexpected { .. } => false,
        }
    }
}

/// Defines a Rust enum mirroring some variants of a librdkafka C enum, with conversions
/// both ways generated from the same table so they cannot disagree.
macro_rules! c_enum {
    (
        $(#[$meta:meta])* $name:ident <=> $c:ident {
            $($(#[$vmeta:meta])* $variant:ident = $cvariant:ident,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];
        }

        impl From<$name> for $c {
            fn from(v: $name) -> $c {
                match v {
                    $($name::$variant => $c::$cvariant,)+
                }
            }
        }

        impl TryFrom<$c> for $name {
            type Error = $c;
            fn try_from(c: $c) -> Result<Self, $c> {
                match c {
                    $($c::$cvariant => Ok($name::$variant),)+
                    other => Err(other),
                }
            }
        }
    };
}

c_enum! {
    /// The kind of resource an ACL protects.
    ResourceType <=> rd_kafka_ResourceType_t {
        /// A topic.
        Topic = RD_KAFKA_RESOURCE_TOPIC,
        /// A consumer group.
        Group = RD_KAFKA_RESOURCE_GROUP,
        /// The cluster itself (resource name `kafka-cluster`). librdkafka calls it
        /// "broker"; both are code 4 in Kafka's protocol.
        Cluster = RD_KAFKA_RESOURCE_BROKER,
        /// A transactional id.
        TransactionalId = RD_KAFKA_RESOURCE_TRANSACTIONAL_ID,
    }
}

c_enum! {
    /// How an ACL's resource name is matched.
    PatternType <=> rd_kafka_ResourcePatternType_t {
        /// The exact name (`*` meaning every resource).
        Literal = RD_KAFKA_RESOURCE_PATTERN_LITERAL,
        /// Every name starting with the resource name.
        Prefixed = RD_KAFKA_RESOURCE_PATTERN_PREFIXED,
    }
}

c_enum! {
    /// Which pattern types an [`AclFilter`] selects.
    PatternTypeFilter <=> rd_kafka_ResourcePatternType_t {
        /// Any pattern type; the name, if given, is compared literally.
        Any = RD_KAFKA_RESOURCE_PATTERN_ANY,
        /// Every ACL that applies to the named resource: literal ones for that name or
        /// `*`, and prefixed ones whose prefix it starts with.
        Match = RD_KAFKA_RESOURCE_PATTERN_MATCH,
        /// Literal ACLs only.
        Literal = RD_KAFKA_RESOURCE_PATTERN_LITERAL,
        /// Prefixed ACLs only.
        Prefixed = RD_KAFKA_RESOURCE_PATTERN_PREFIXED,
    }
}

c_enum! {
    /// What an ACL allows or denies.
    AclOperation <=> rd_kafka_AclOperation_t {
        /// Every operation.
        All = RD_KAFKA_ACL_OPERATION_ALL,
        /// Read.
        Read = RD_KAFKA_ACL_OPERATION_READ,
        /// Write.
        Write = RD_KAFKA_ACL_OPERATION_WRITE,
        /// Create.
        Create = RD_KAFKA_ACL_OPERATION_CREATE,
        /// Delete.
        Delete = RD_KAFKA_ACL_OPERATION_DELETE,
        /// Alter.
        Alter = RD_KAFKA_ACL_OPERATION_ALTER,
        /// Describe.
        Describe = RD_KAFKA_ACL_OPERATION_DESCRIBE,
        /// Inter-broker actions.
        ClusterAction = RD_KAFKA_ACL_OPERATION_CLUSTER_ACTION,
        /// Describe configs.
        DescribeConfigs = RD_KAFKA_ACL_OPERATION_DESCRIBE_CONFIGS,
        /// Alter configs.
        AlterConfigs = RD_KAFKA_ACL_OPERATION_ALTER_CONFIGS,
        /// Idempotent produce.
        IdempotentWrite = RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE,
    }
}

c_enum! {
    /// Whether an ACL allows or denies.
    AclPermission <=> rd_kafka_AclPermissionType_t {
        /// Allow.
        Allow = RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW,
        /// Deny; wins over any Allow.
        Deny = RD_KAFKA_ACL_PERMISSION_TYPE_DENY,
    }
}

c_enum! {
    /// A SCRAM hash function.
    ScramMechanism <=> rd_kafka_ScramMechanism_t {
        /// SCRAM-SHA-256.
        Sha256 = RD_KAFKA_SCRAM_MECHANISM_SHA_256,
        /// SCRAM-SHA-512.
        Sha512 = RD_KAFKA_SCRAM_MECHANISM_SHA_512,
    }
}

/// Which records count as readable for [`NativeAdmin::list_offsets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsolationLevel {
    /// Every record, including those of open or aborted transactions.
    ReadUncommitted,
    /// Only records of committed transactions: "latest" is the last stable offset.
    ReadCommitted,
}

impl From<IsolationLevel> for rd_kafka_IsolationLevel_t {
    fn from(level: IsolationLevel) -> Self {
        match level {
            IsolationLevel::ReadUncommitted => Self::RD_KAFKA_ISOLATION_LEVEL_READ_UNCOMMITTED,
            IsolationLevel::ReadCommitted => Self::RD_KAFKA_ISOLATION_LEVEL_READ_COMMITTED,
        }
    }
}

/// Which offset [`NativeAdmin::list_offsets`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log-start offset: the first record still stored.
    Earliest,
    /// The log-end offset (or last stable offset, under read_committed).
    Latest,
    /// The offset of the first record whose timestamp is at or after this time
    /// (milliseconds since the Unix epoch); `-1` when the partition has none.
    Timestamp(i64),
}

/// One change of [`NativeAdmin::alter_topic_configs`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConfigOp {
    /// Set the config `.0` to `.1`.
    Set(String, String),
    /// Remove the topic's own value of the config: it falls back to the broker's.
    Delete(String),
}

/// One ACL. Ordered and hashable so callers can diff desired and actual sets.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AclBinding {
    /// The kind of resource.
    pub resource_type: ResourceType,
    /// The resource name, or prefix for [`PatternType::Prefixed`]; `*` for all.
    pub resource_name: String,
    /// How `resource_name` is matched.
    pub pattern_type: PatternType,
    /// Whom it applies to, like `User:alice`.
    pub principal: String,
    /// The client host it applies to; usually `*`.
    pub host: String,
    /// The operation.
    pub operation: AclOperation,
    /// Allow or deny.
    pub permission: AclPermission,
}

/// Selects ACLs to describe or delete; `None` fields match anything.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AclFilter {
    /// The kind of resource.
    pub resource_type: Option<ResourceType>,
    /// The resource name (interpreted according to `pattern_type`).
    pub resource_name: Option<String>,
    /// Which pattern types.
    pub pattern_type: PatternTypeFilter,
    /// The principal, like `User:alice`.
    pub principal: Option<String>,
    /// The host.
    pub host: Option<String>,
    /// The operation.
    pub operation: Option<AclOperation>,
    /// Allow or deny.
    pub permission: Option<AclPermission>,
}

impl AclFilter {
    /// Every literal Allow ACL, of any principal: the shape EventOps gives its own.
    pub fn literal_allow() -> Self {
        Self {
            resource_type: None,
            resource_name: None,
            pattern_type: PatternTypeFilter::Literal,
            principal: None,
            host: None,
            operation: None,
            permission: Some(AclPermission::Allow),
        }
    }

    /// Every ACL of `principal`.
    pub fn principal(principal: &str) -> Self {
        Self {
            resource_type: None,
            resource_name: None,
            pattern_type: PatternTypeFilter::Any,
            principal: Some(principal.into()),
            host: None,
            operation: None,
            permission: None,
        }
    }
}

impl From<&AclBinding> for AclFilter {
    /// Exactly that ACL.
    fn from(b: &AclBinding) -> Self {
        Self {
            resource_type: Some(b.resource_type),
            resource_name: Some(b.resource_name.clone()),
            pattern_type: match b.pattern_type {
                PatternType::Literal => PatternTypeFilter::Literal,
                PatternType::Prefixed => PatternTypeFilter::Prefixed,
            },
            principal: Some(b.principal.clone()),
            host: Some(b.host.clone()),
            operation: Some(b.operation),
            permission: Some(b.permission),
        }
    }
}

/// One SCRAM credential of a user (Kafka never reveals the salt or hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScramCredential {
    /// The hash function.
    pub mechanism: ScramMechanism,
    /// PBKDF2 iterations.
    pub iterations: i32,
}

/// A topic's partition count and replication factor, as Kafka describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicLayout {
    /// Number of partitions.
    pub partitions: i32,
    /// Replicas of partition 0.
    pub replication_factor: i32,
}

/// The cluster as Kafka describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterDescription {
    /// The cluster id (the KRaft cluster id).
    pub cluster_id: String,
    /// The id of the controller node, if Kafka reported one.
    pub controller: Option<i32>,
    /// The brokers, sorted by id.
    pub nodes: Vec<ClusterNode>,
}

/// One broker of a [`ClusterDescription`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    /// The broker id.
    pub id: i32,
    /// The host it advertises.
    pub host: String,
    /// The port it advertises.
    pub port: u16,
}

c_enum! {
    /// A consumer group's state, as Kafka reports it.
    GroupState <=> rd_kafka_consumer_group_state_t {
        /// A state librdkafka does not know (for example `Assigning` or `Reconciling`
        /// of a group on the KIP-848 consumer protocol).
        Unknown = RD_KAFKA_CONSUMER_GROUP_STATE_UNKNOWN,
        /// Members are (re)joining.
        PreparingRebalance = RD_KAFKA_CONSUMER_GROUP_STATE_PREPARING_REBALANCE,
        /// Members have joined and wait for their assignment.
        CompletingRebalance = RD_KAFKA_CONSUMER_GROUP_STATE_COMPLETING_REBALANCE,
        /// Members consume their assignment.
        Stable = RD_KAFKA_CONSUMER_GROUP_STATE_STABLE,
        /// No such group: Kafka reports a group it does not have (never used, or whose
        /// offsets expired) as `Dead`, not as an error.
        Dead = RD_KAFKA_CONSUMER_GROUP_STATE_DEAD,
        /// No members, but committed offsets: offsets can be altered from outside the
        /// group only now (or while it is `Dead`, which creates it).
        Empty = RD_KAFKA_CONSUMER_GROUP_STATE_EMPTY,
    }
}

/// A consumer group as Kafka describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDescription {
    /// Its state.
    pub state: GroupState,
    /// How many members it has.
    pub members: usize,
    /// The partition assignor its members agreed on (`range`, `cooperative-sticky`,
    /// ...); empty while it has no members.
    pub assignor: String,
    /// The id of the broker coordinating it, if Kafka reported one.
    pub coordinator: Option<i32>,
}

/// The SCRAM mechanism and iteration count [`NativeAdmin::upsert_scram_user`] uses.
pub const SCRAM_MECHANISM: ScramMechanism = ScramMechanism::Sha512;
/// See [`SCRAM_MECHANISM`].
pub const SCRAM_ITERATIONS: i32 = 8192;

type Client = AdminClient<DefaultClientContext>;

/// ACL, SCRAM, cluster and consumer group administration on an existing admin client.
/// Cheap to clone.
#[derive(Clone)]
pub struct NativeAdmin {
    dispatch: Arc<Dispatch>,
    timeout: Duration,
}

impl NativeAdmin {
    /// Uses `client`'s connection; each request gives up after `timeout`. Starts the
    /// thread that hands out every result (one per `NativeAdmin` and its clones, which
    /// ends once they are all dropped): create one and clone it.
    pub fn new(client: Arc<AdminClient<DefaultClientContext>>, timeout: Duration) -> Self {
        Self {
            dispatch: Dispatch::start(client),
            timeout,
        }
    }

    /// Creates ACLs; creating one that exists is not an error. On error some of them
    /// may have been created, so retry the whole set.
    pub async fn create_acls(&self, acls: &[AclBinding]) -> Result<(), NativeError> {
        const OP: &str = "create ACLs";
        if acls.is_empty() {
            return Ok(());
        }
        let acls = acls.to_vec();
        let event = {
            let c_acls = acls
                .iter()
                .map(|a| new_acl(a.try_into()?, true))
                .collect::<Result<Vec<_>, _>>()?;
            let mut ptrs: Vec<_> = c_acls.iter().map(Owned::as_ptr).collect();
            self.send(
                OP,
                Api::CreateAcls,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: `ptrs` holds valid bindings that librdkafka copies; rk,
                    // options and queue are valid for the call.
                    unsafe {
                        rd_kafka_CreateAcls(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
                    }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a CreateAcls result, which owns
        // the array it returns.
        let results = unsafe {
            let result = rd_kafka_event_CreateAcls_result(event.as_ptr());
            c_array(rd_kafka_CreateAcls_result_acls(result, &mut n), n)
        };
        if results.len() != acls.len() {
            return Err(unexpected(
                OP,
                format!("{n} results for {} ACLs", acls.len()),
            ));
        }
        for (acl, result) in acls.iter().zip(results) {
            // SAFETY: `result` belongs to the live event, and so does its error.
            let error = unsafe { item_error(rd_kafka_acl_result_error(*result)) };
            if let Some((code, message)) = error {
                return Err(refused(OP, code, format!("{message} ({acl:?})")));
            }
        }
        Ok(())
    }

    /// The ACLs matching `filter`, sorted.
    pub async fn describe_acls(&self, filter: &AclFilter) -> Result<Vec<AclBinding>, NativeError> {
        const OP: &str = "describe ACLs";
        let filter = filter.clone();
        let event = {
            let c_filter = new_acl((&filter).try_into()?, false)?;
            self.send(
                OP,
                Api::DescribeAcls,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: the filter is valid and librdkafka copies it; rk, options and
                    // queue are valid for the call.
                    unsafe { rd_kafka_DescribeAcls(rk, c_filter.as_ptr(), options, queue) }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a DescribeAcls result, which owns
        // the array it returns.
        let acls = unsafe {
            let result = rd_kafka_event_DescribeAcls_result(event.as_ptr());
            c_array(rd_kafka_DescribeAcls_result_acls(result, &mut n), n)
        };
        let mut acls = acls
            .iter()
            // SAFETY: each binding belongs to the live event.
            .map(|acl| unsafe { read_acl(OP, *acl) })
            .collect::<Result<Vec<_>, _>>()?;
        acls.sort();
        Ok(acls)
    }

    /// Deletes the ACLs matching any of `filters` and returns them, sorted. On error
    /// some may have been deleted.
    pub async fn delete_acls(&self, filters: &[AclFilter]) -> Result<Vec<AclBinding>, NativeError> {
        const OP: &str = "delete ACLs";
        if filters.is_empty() {
            return Ok(Vec::new());
        }
        let filters = filters.to_vec();
        let event = {
            let c_filters = filters
                .iter()
                .map(|f| new_acl(f.try_into()?, false))
                .collect::<Result<Vec<_>, _>>()?;
            let mut ptrs: Vec<_> = c_filters.iter().map(Owned::as_ptr).collect();
            self.send(
                OP,
                Api::DeleteAcls,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: `ptrs` holds valid filters that librdkafka copies; rk, options
                    // and queue are valid for the call.
                    unsafe {
                        rd_kafka_DeleteAcls(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
                    }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a DeleteAcls result, which owns
        // the array it returns.
        let responses = unsafe {
            let result = rd_kafka_event_DeleteAcls_result(event.as_ptr());
            c_array(rd_kafka_DeleteAcls_result_responses(result, &mut n), n)
        };
        let mut deleted = Vec::new();
        for response in responses {
            // SAFETY: `response` belongs to the live event, and so do the error and
            // matching bindings it returns.
            unsafe {
                if let Some((code, message)) =
                    item_error(rd_kafka_DeleteAcls_result_response_error(*response))
                {
                    return Err(refused(OP, code, message));
                }
                let mut m = 0;
                let matching = c_array(
                    rd_kafka_DeleteAcls_result_response_matching_acls(*response, &mut m),
                    m,
                );
                for acl in matching {
                    let binding = read_acl(OP, *acl)?;
                    // Kafka reports each matching ACL it failed to delete separately.
                    if let Some((code, message)) = item_error(rd_kafka_AclBinding_error(*acl)) {
                        return Err(refused(OP, code, format!("{message} ({binding:?})")));
                    }
                    deleted.push(binding);
                }
            }
        }
        deleted.sort();
        deleted.dedup();
        Ok(deleted)
    }

    /// Sets `user`'s [`SCRAM_MECHANISM`] password (with [`SCRAM_ITERATIONS`] and a salt
    /// librdkafka generates), creating the credential if needed.
    pub async fn upsert_scram_user(&self, user: &str, password: &str) -> Result<(), NativeError> {
        const OP: &str = "upsert SCRAM credential";
        let c_user = c_string("user", user)?;
        let password = password.as_bytes().to_vec();
        let event = {
            // SAFETY: the strings are valid for the call, which copies them; a null salt
            // of length 0 asks librdkafka for a random one.
            let alteration = unsafe {
                rd_kafka_UserScramCredentialUpsertion_new(
                    c_user.as_ptr(),
                    SCRAM_MECHANISM.into(),
                    SCRAM_ITERATIONS,
                    password.as_ptr(),
                    password.len(),
                    ptr::null(),
                    0,
                )
            };
            // SAFETY: a fresh alteration, owned by no one else.
            let alteration =
                unsafe { Owned::new(alteration, rd_kafka_UserScramCredentialAlteration_destroy) }
                    .ok_or_else(|| unexpected(OP, "librdkafka returned no alteration".into()))?;
            self.send_alter_scram(OP, &alteration)?
        }
        .result()
        .await?;
        alter_scram_result(OP, &event)
    }

    /// Removes `user`'s [`SCRAM_MECHANISM`] credential (other mechanisms stay). Returns
    /// whether there was one.
    pub async fn delete_scram_user(&self, user: &str) -> Result<bool, NativeError> {
        const OP: &str = "delete SCRAM credential";
        let c_user = c_string("user", user)?;
        let event = {
            // SAFETY: the string is valid for the call, which copies it.
            let alteration = unsafe {
                rd_kafka_UserScramCredentialDeletion_new(c_user.as_ptr(), SCRAM_MECHANISM.into())
            };
            // SAFETY: a fresh alteration, owned by no one else.
            let alteration =
                unsafe { Owned::new(alteration, rd_kafka_UserScramCredentialAlteration_destroy) }
                    .ok_or_else(|| unexpected(OP, "librdkafka returned no alteration".into()))?;
            self.send_alter_scram(OP, &alteration)?
        }
        .result()
        .await;
        match event.and_then(|event| alter_scram_result(OP, &event)) {
            Ok(()) => Ok(true),
            Err(NativeError::Kafka {
                code: RDKafkaErrorCode::ResourceNotFound,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends one SCRAM alteration; [`alter_scram_result`] reads its answer.
    fn send_alter_scram(
        &self,
        op: &'static str,
        alteration: &Owned<rd_kafka_UserScramCredentialAlteration_t>,
    ) -> Result<Pending, NativeError> {
        let mut ptrs = [alteration.as_ptr()];
        self.send(
            op,
            Api::AlterScram,
            |_| Ok(()),
            |rk, options, queue| {
                // SAFETY: `ptrs` holds one valid alteration that librdkafka copies; rk, options
                // and queue are valid for the call.
                unsafe {
                    rd_kafka_AlterUserScramCredentials(
                        rk,
                        ptrs.as_mut_ptr(),
                        ptrs.len(),
                        options,
                        queue,
                    )
                }
            },
        )
    }

    /// The SCRAM credentials of `users`, keyed by user. Every requested user is a key; a
    /// user without credentials maps to an empty list. An empty `users` asks for every
    /// user that has credentials. Duplicates are ignored.
    pub async fn describe_scram_users(
        &self,
        users: &[&str],
    ) -> Result<BTreeMap<String, Vec<ScramCredential>>, NativeError> {
        const OP: &str = "describe SCRAM credentials";
        // librdkafka refuses duplicates.
        let users: BTreeSet<&str> = users.iter().copied().collect();
        let c_users = users
            .into_iter()
            .map(|u| c_string("user", u))
            .collect::<Result<Vec<_>, _>>()?;
        let event = {
            let mut ptrs: Vec<_> = c_users.iter().map(|u| u.as_ptr()).collect();
            self.send(
                OP,
                Api::DescribeScram,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: `ptrs` points into `c_users`, which outlives the call; librdkafka
                    // copies the strings. rk, options and queue are valid for the call.
                    unsafe {
                        rd_kafka_DescribeUserScramCredentials(
                            rk,
                            ptrs.as_mut_ptr(),
                            ptrs.len(),
                            options,
                            queue,
                        )
                    }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a DescribeUserScramCredentials
        // result, which owns the array it returns.
        let descriptions = unsafe {
            let result = rd_kafka_event_DescribeUserScramCredentials_result(event.as_ptr());
            c_array(
                rd_kafka_DescribeUserScramCredentials_result_descriptions(result, &mut n),
                n,
            )
        };
        descriptions
            .iter()
            // SAFETY: each description belongs to the live event.
            .map(|d| unsafe { read_scram_user(OP, *d) })
            .collect()
    }

    /// The cluster's id, controller and brokers.
    pub async fn describe_cluster(&self) -> Result<ClusterDescription, NativeError> {
        const OP: &str = "describe cluster";
        let event = {
            self.send(
                OP,
                Api::DescribeCluster,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: rk, options and queue are valid for the call.
                    unsafe { rd_kafka_DescribeCluster(rk, options, queue) }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a DescribeCluster result, which owns
        // the cluster id, the controller and the node array, and each node's host.
        unsafe {
            let result = rd_kafka_event_DescribeCluster_result(event.as_ptr());
            let cluster_id = read_string(rd_kafka_DescribeCluster_result_cluster_id(result));
            // Null when Kafka reported no controller.
            let controller = rd_kafka_DescribeCluster_result_controller(result);
            let controller = (!controller.is_null()).then(|| rd_kafka_Node_id(controller));
            let mut nodes: Vec<_> =
                c_array(rd_kafka_DescribeCluster_result_nodes(result, &mut n), n)
                    .iter()
                    .map(|node| ClusterNode {
                        id: rd_kafka_Node_id(*node),
                        host: read_string(rd_kafka_Node_host(*node)),
                        port: rd_kafka_Node_port(*node),
                    })
                    .collect();
            nodes.sort_by_key(|node| node.id);
            Ok(ClusterDescription {
                cluster_id,
                controller,
                nodes,
            })
        }
    }

    /// The partition count and replication factor of each of `topics`, in one
    /// DescribeTopics (Metadata) request that never creates a topic. A topic Kafka does
    /// not have is `Ok(None)`; a topic Kafka refuses to describe (not authorized) carries
    /// Kafka's refusal. Duplicates are ignored.
    pub async fn describe_topics(
        &self,
        topics: &[&str],
    ) -> Result<BTreeMap<String, Result<Option<TopicLayout>, NativeError>>, NativeError> {
        const OP: &str = "describe topics";
        let names: BTreeSet<&str> = topics.iter().copied().collect();
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let c_names = names
            .into_iter()
            .map(|t| c_string("topic", t))
            .collect::<Result<Vec<_>, _>>()?;
        let event = {
            let mut ptrs: Vec<_> = c_names.iter().map(|t| t.as_ptr()).collect();
            // SAFETY: `ptrs` points into `c_names`, which outlives the call; librdkafka
            // copies the names into the collection it returns, which we own.
            let collection = unsafe {
                Owned::new(
                    rd_kafka_TopicCollection_of_topic_names(ptrs.as_mut_ptr(), ptrs.len()),
                    rd_kafka_TopicCollection_destroy,
                )
            }
            .ok_or_else(|| unexpected(OP, "librdkafka returned no topic collection".into()))?;
            self.send(
                OP,
                Api::DescribeTopics,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: the collection is live and librdkafka copies it; rk, options
                    // and queue are valid for the call.
                    unsafe { rd_kafka_DescribeTopics(rk, collection.as_ptr(), options, queue) }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a DescribeTopics result, which owns
        // the descriptions, their names, errors, partitions and replica arrays.
        unsafe {
            let result = rd_kafka_event_DescribeTopics_result(event.as_ptr());
            let descriptions = c_array(rd_kafka_DescribeTopics_result_topics(result, &mut n), n);
            let mut answer = BTreeMap::new();
            // A topic the broker left out of its answer leaves a null in the array.
            for d in descriptions.iter().filter(|d| !d.is_null()) {
                let name = read_string(rd_kafka_TopicDescription_name(*d));
                let layout = match item_error(rd_kafka_TopicDescription_error(*d)) {
                    Some((RDKafkaErrorCode::UnknownTopicOrPartition, _)) => Ok(None),
                    Some((code, message)) => {
                        Err(refused(OP, code, format!("{message} (topic {name})")))
                    }
                    None => {
                        let mut count = 0;
                        let partitions =
                            c_array(rd_kafka_TopicDescription_partitions(*d, &mut count), count);
                        // Replicas of partition 0: every partition has the same count
                        // unless reassigned by hand.
                        let replication_factor = partitions
                            .iter()
                            .find(|p| rd_kafka_TopicPartitionInfo_partition(**p) == 0)
                            .map_or(0, |p| {
                                let mut replicas = 0;
                                rd_kafka_TopicPartitionInfo_replicas(*p, &mut replicas);
                                replicas as i32
                            });
                        Ok(Some(TopicLayout {
                            partitions: partitions.len() as i32,
                            replication_factor,
                        }))
                    }
                };
                answer.insert(name, layout);
            }
            Ok(answer)
        }
    }

    /// The earliest, latest or by-time offset of each of `partitions`, in one ListOffsets request
    /// per partition leader. With [`IsolationLevel::ReadCommitted`], "latest" is the last
    /// stable offset: records of open transactions are not counted. A partition Kafka
    /// reports an error for is left out of the answer, so callers see it as unknown
    /// rather than as offset 0. Duplicates are ignored.
    pub async fn list_offsets(
        &self,
        partitions: &[(String, i32)],
        spec: OffsetSpec,
        isolation: IsolationLevel,
    ) -> Result<BTreeMap<(String, i32), i64>, NativeError> {
        const OP: &str = "list offsets";
        let partitions: BTreeSet<(String, i32)> = partitions.iter().cloned().collect();
        if partitions.is_empty() {
            return Ok(BTreeMap::new());
        }
        for (topic, _) in &partitions {
            c_string("topic", topic)?;
        }
        let event = {
            let mut list = rdkafka::TopicPartitionList::with_capacity(partitions.len());
            let offset = match spec {
                OffsetSpec::Earliest => rdkafka::Offset::Beginning,
                OffsetSpec::Latest => rdkafka::Offset::End,
                OffsetSpec::Timestamp(ms) => rdkafka::Offset::Offset(ms.max(0)),
            };
            for (topic, partition) in &partitions {
                list.add_partition_offset(topic, *partition, offset)
                    .map_err(|e| NativeError::InvalidArgument(e.to_string()))?;
            }
            self.send(
                OP,
                Api::ListOffsets,
                |options| {
                    // SAFETY: options is live for the call; a returned error is ours to
                    // destroy, which Owned does.
                    let error = unsafe {
                        Owned::new(
                            rd_kafka_AdminOptions_set_isolation_level(options, isolation.into()),
                            rd_kafka_error_destroy,
                        )
                    };
                    // SAFETY: the error is live while `error` is.
                    match error.and_then(|e| unsafe { item_error(e.as_ptr()) }) {
                        Some((_, message)) => Err(NativeError::InvalidArgument(message)),
                        None => Ok(()),
                    }
                },
                |rk, options, queue| {
                    // SAFETY: the list is valid and librdkafka copies it; rk, options and
                    // queue are valid for the call.
                    unsafe { rd_kafka_ListOffsets(rk, list.ptr(), options, queue) }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a ListOffsets result, which owns the
        // array it returns and each info's partition.
        unsafe {
            let result = rd_kafka_event_ListOffsets_result(event.as_ptr());
            let infos = c_array(rd_kafka_ListOffsets_result_infos(result, &mut n), n);
            let mut offsets = BTreeMap::new();
            for info in infos {
                let tp = rd_kafka_ListOffsetsResultInfo_topic_partition(*info);
                // Read the error as the int it is (see `raw`): any code but 0 is an
                // error, known to the binding or not.
                let err = ptr::addr_of!((*tp).err).cast::<c_int>().read();
                let tp = &*tp;
                // By timestamp, Kafka answers -1 for a partition without a record
                // that late: an answer, not an error.
                let by_time = matches!(spec, OffsetSpec::Timestamp(_));
                if err == 0 && (tp.offset >= 0 || (by_time && tp.offset == -1)) {
                    offsets.insert((read_string(tp.topic), tp.partition), tp.offset);
                }
            }
            Ok(offsets)
        }
    }

    /// Creates one topic. `replication_factor` `None` takes the broker's default. With
    /// `validate_only` the broker checks the request (names, configs, replicas) and
    /// creates nothing. A refusal carries Kafka's own message, which names the config
    /// Kafka rejects.
    pub async fn create_topic(
        &self,
        topic: &str,
        partitions: i32,
        replication_factor: Option<i32>,
        configs: &BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), NativeError> {
        const OP: &str = "create topic";
        let c_topic = c_string("topic", topic)?;
        let c_configs = configs
            .iter()
            .map(|(k, v)| Ok((c_string("config key", k)?, c_string("config value", v)?)))
            .collect::<Result<Vec<_>, NativeError>>()?;
        let topic = topic.to_string();
        let event = {
            let mut errstr = [0 as c_char; 512];
            // SAFETY: the name is NUL-terminated and copied; errstr is writable for its
            // length.
            let new = unsafe {
                rd_kafka_NewTopic_new(
                    c_topic.as_ptr(),
                    partitions,
                    replication_factor.unwrap_or(-1),
                    errstr.as_mut_ptr(),
                    errstr.len(),
                )
            };
            // SAFETY: a fresh NewTopic, owned by no one else.
            let new = match unsafe { Owned::new(new, rd_kafka_NewTopic_destroy) } {
                Some(new) => new,
                // SAFETY: on failure librdkafka wrote a NUL-terminated message.
                None => {
                    return Err(NativeError::InvalidArgument(format!(
                        "{OP} {topic}: {}",
                        unsafe { read_string(errstr.as_ptr()) }
                    )));
                }
            };
            for (k, v) in &c_configs {
                // SAFETY: the NewTopic is live; the strings are NUL-terminated and copied.
                let err =
                    unsafe { rd_kafka_NewTopic_set_config(new.as_ptr(), k.as_ptr(), v.as_ptr()) };
                if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                    return Err(NativeError::InvalidArgument(format!(
                        "{OP} {topic}: config {k:?}={v:?} is not accepted"
                    )));
                }
            }
            let mut ptrs = [new.as_ptr()];
            self.send(
                OP,
                Api::CreateTopics,
                |options| {
                    set_validate_only(options, validate_only)?;
                    // Wait (as long as the request may) until the topic is created
                    // everywhere, so that describing it right after finds it.
                    set_operation_timeout(options, self.timeout)
                },
                |rk, options, queue| {
                    // SAFETY: `ptrs` holds one valid NewTopic that librdkafka copies; rk,
                    // options and queue are valid for the call.
                    unsafe {
                        rd_kafka_CreateTopics(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
                    }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a CreateTopics result, which owns the
        // array and each result's strings.
        unsafe {
            let result = rd_kafka_event_CreateTopics_result(event.as_ptr());
            let results = c_array(rd_kafka_CreateTopics_result_topics(result, &mut n), n);
            if results.len() != 1 {
                return Err(unexpected(OP, format!("{n} results for one topic")));
            }
            let code = raw::rd_kafka_topic_result_error(results[0]);
            let message = read_string(rd_kafka_topic_result_error_string(results[0]));
            match kafka_error(code, message) {
                Some((code, message)) => Err(refused(OP, code, message)),
                None => Ok(()),
            }
        }
    }

    /// Changes only the topic configs `ops` name, in one IncrementalAlterConfigs request:
    /// every config not named keeps its value. With `validate_only` the broker checks the
    /// changes and makes none. A refusal carries Kafka's own message.
    pub async fn alter_topic_configs(
        &self,
        topic: &str,
        ops: &[ConfigOp],
        validate_only: bool,
    ) -> Result<(), NativeError> {
        const OP: &str = "alter topic configs";
        // librdkafka refuses an empty request; nothing to change is success.
        if ops.is_empty() {
            return Ok(());
        }
        let c_topic = c_string("topic", topic)?;
        let c_ops = ops
            .iter()
            .map(|op| {
                Ok(match op {
                    ConfigOp::Set(k, v) => (
                        c_string("config key", k)?,
                        rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                        Some(c_string("config value", v)?),
                    ),
                    ConfigOp::Delete(k) => (
                        c_string("config key", k)?,
                        rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_DELETE,
                        None,
                    ),
                })
            })
            .collect::<Result<Vec<_>, NativeError>>()?;
        let event = {
            // SAFETY: the name is NUL-terminated and copied.
            let resource = unsafe {
                rd_kafka_ConfigResource_new(
                    rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                    c_topic.as_ptr(),
                )
            };
            // SAFETY: a fresh resource, owned by no one else.
            let resource = unsafe { Owned::new(resource, rd_kafka_ConfigResource_destroy) }
                .ok_or_else(|| unexpected(OP, "librdkafka returned no config resource".into()))?;
            for (k, op, v) in &c_ops {
                let v = v.as_ref().map_or(ptr::null(), |v| v.as_ptr());
                // SAFETY: the resource is live; the strings are NUL-terminated (or null
                // for DELETE) and copied. A returned error is ours to destroy.
                let error = unsafe {
                    Owned::new(
                        rd_kafka_ConfigResource_add_incremental_config(
                            resource.as_ptr(),
                            k.as_ptr(),
                            *op,
                            v,
                        ),
                        rd_kafka_error_destroy,
                    )
                };
                // SAFETY: the error is live while `error` is.
                if let Some((_, message)) = error.and_then(|e| unsafe { item_error(e.as_ptr()) }) {
                    return Err(NativeError::InvalidArgument(format!("{OP}: {message}")));
                }
            }
            let mut ptrs = [resource.as_ptr()];
            self.send(
                OP,
                Api::IncrementalAlterConfigs,
                |options| set_validate_only(options, validate_only),
                |rk, options, queue| {
                    // SAFETY: `ptrs` holds one valid resource that librdkafka copies; rk,
                    // options and queue are valid for the call.
                    unsafe {
                        rd_kafka_IncrementalAlterConfigs(
                            rk,
                            ptrs.as_mut_ptr(),
                            ptrs.len(),
                            options,
                            queue,
                        )
                    }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is an IncrementalAlterConfigs result,
        // which owns the array and each resource's error string.
        unsafe {
            let result = rd_kafka_event_IncrementalAlterConfigs_result(event.as_ptr());
            let resources = c_array(
                rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut n),
                n,
            );
            if resources.len() != 1 {
                return Err(unexpected(OP, format!("{n} results for one topic")));
            }
            let code = raw::rd_kafka_ConfigResource_error(resources[0]);
            let message = read_string(rd_kafka_ConfigResource_error_string(resources[0]));
            match kafka_error(code, message) {
                Some((code, message)) => Err(refused(OP, code, message)),
                None => Ok(()),
            }
        }
    }

    /// The configs set on each of `topics` itself (source `DYNAMIC_TOPIC_CONFIG`), in
    /// one DescribeConfigs request: what an EventTopic may have set, and all that is
    /// copied out of the answer. Kafka answers every config of every topic (with its
    /// synonyms, which stay in librdkafka's answer); the `rdkafka` crate's
    /// `describe_configs` copied every config into Rust strings first (about 5 MB held
    /// at once for 1,000 topics, measured with heaptrack), and it dropped each topic's
    /// own error. A topic Kafka refused to describe has its own error here.
    pub async fn describe_topic_configs(
        &self,
        topics: &[&str],
    ) -> Result<BTreeMap<String, Result<BTreeMap<String, String>, NativeError>>, NativeError> {
        const OP: &str = "describe configs of";
        let names: BTreeSet<&str> = topics.iter().copied().collect();
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let event = {
            let resources = names
                .into_iter()
                .map(|t| {
                    let c_topic = c_string("topic", t)?;
                    // SAFETY: the name is NUL-terminated and copied.
                    let resource = unsafe {
                        rd_kafka_ConfigResource_new(
                            rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                            c_topic.as_ptr(),
                        )
                    };
                    // SAFETY: a fresh resource, owned by no one else.
                    unsafe { Owned::new(resource, rd_kafka_ConfigResource_destroy) }.ok_or_else(
                        || unexpected(OP, "librdkafka returned no config resource".into()),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut ptrs: Vec<_> = resources.iter().map(|r| r.as_ptr()).collect();
            self.send(
                OP,
                Api::DescribeConfigs,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: `ptrs` holds live resources (no config names: every config)
                    // that librdkafka copies; rk, options and queue are valid for the call.
                    unsafe {
                        rd_kafka_DescribeConfigs(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
                    }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a DescribeConfigs result, which owns
        // the resources, their names, errors and config entries.
        unsafe {
            let result = rd_kafka_event_DescribeConfigs_result(event.as_ptr());
            let described = c_array(rd_kafka_DescribeConfigs_result_resources(result, &mut n), n);
            let mut answer = BTreeMap::new();
            for r in described.iter().filter(|r| !r.is_null()) {
                let name = read_string(rd_kafka_ConfigResource_name(*r));
                let code = raw::rd_kafka_ConfigResource_error(*r);
                let message = read_string(rd_kafka_ConfigResource_error_string(*r));
                let configs = match kafka_error(code, message) {
                    Some((code, message)) => Err(refused(OP, code, message)),
                    None => {
                        let mut count = 0;
                        let entries =
                            c_array(rd_kafka_ConfigResource_configs(*r, &mut count), count);
                        Ok(entries
                            .iter()
                            .filter(|e| {
                                raw::rd_kafka_ConfigEntry_source(**e)
                                    == rd_kafka_ConfigSource_t::RD_KAFKA_CONFIG_SOURCE_DYNAMIC_TOPIC_CONFIG as c_int
                            })
                            .filter_map(|e| {
                                let value = rd_kafka_ConfigEntry_value(*e);
                                (!value.is_null()).then(|| {
                                    (read_string(rd_kafka_ConfigEntry_name(*e)), read_string(value))
                                })
                            })
                            .collect())
                    }
                };
                answer.insert(name, configs);
            }
            Ok(answer)
        }
    }

    /// The state, member count, assignor and coordinator of consumer group `group`, in
    /// one DescribeGroups request to its coordinator (librdkafka first asks with
    /// ConsumerGroupDescribe, which Kafka answers for groups on the KIP-848 consumer
    /// protocol only). A group Kafka does not have is not an error: Kafka answers
    /// librdkafka's DescribeGroups (version 4 at most) with [`GroupState::Dead`] and no
    /// members. (Kafka 4.3's own ConsumerGroupCommand reports the same group as
    /// `GroupIdNotFoundException` instead.) Asked again, for 3 s at most, while Kafka
    /// answers that the coordinator moved or is loading.
    pub async fn describe_consumer_group(
        &self,
        group: &str,
    ) -> Result<GroupDescription, NativeError> {
        // The group's coordinator moves, or is still loading, for a moment after a
        // broker starts: ask again, as Kafka's own admin client does.
        let mut delay = Duration::from_millis(200);
        loop {
            match self.describe_consumer_group_once(group).await {
                Err(NativeError::Kafka {
                    code:
                        RDKafkaErrorCode::NotCoordinator
                        | RDKafkaErrorCode::CoordinatorLoadInProgress
                        | RDKafkaErrorCode::CoordinatorNotAvailable,
                    ..
                }) if delay < Duration::from_secs(2) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                answer => return answer,
            }
        }
    }

    async fn describe_consumer_group_once(
        &self,
        group: &str,
    ) -> Result<GroupDescription, NativeError> {
        const OP: &str = "describe consumer group";
        let c_group = c_string("group", group)?;
        let group = group.to_string();
        let event = {
            let mut ptrs = [c_group.as_ptr()];
            self.send(
                OP,
                Api::DescribeConsumerGroups,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: `ptrs` points into `c_group`, which outlives the call;
                    // librdkafka copies the name. rk, options and queue are valid for the
                    // call.
                    unsafe {
                        rd_kafka_DescribeConsumerGroups(
                            rk,
                            ptrs.as_mut_ptr(),
                            ptrs.len(),
                            options,
                            queue,
                        )
                    }
                },
            )?
        }
        .result()
        .await?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a DescribeConsumerGroups result,
        // which owns the descriptions, their errors, strings and coordinator nodes.
        unsafe {
            let result = rd_kafka_event_DescribeConsumerGroups_result(event.as_ptr());
            let groups = c_array(
                rd_kafka_DescribeConsumerGroups_result_groups(result, &mut n),
                n,
            );
            let [d] = groups else {
                return Err(unexpected(OP, format!("{n} descriptions for one group")));
            };
            let id = read_string(rd_kafka_ConsumerGroupDescription_group_id(*d));
            if id != group {
                return Err(unexpected(
                    OP,
                    format!("group {id:?} described for {group:?}"),
                ));
            }
            // A request that failed on the way (no coordinator, no answer) is
            // reported here, per group, rather than on the event.
            if let Some((code, message)) = item_error(rd_kafka_ConsumerGroupDescription_error(*d)) {
                return Err(group_refusal(OP, code, message, &group));
            }
            let coordinator = rd_kafka_ConsumerGroupDescription_coordinator(*d);
            Ok(GroupDescription {
                state: group_state(raw::rd_kafka_ConsumerGroupDescription_state(*d)),
                members: rd_kafka_ConsumerGroupDescription_member_count(*d),
                assignor: read_string(rd_kafka_ConsumerGroupDescription_partition_assignor(*d)),
                coordinator: (!coordinator.is_null()).then(|| rd_kafka_Node_id(coordinator)),
            })
        }
    }

    /// The offsets consumer group `group` has committed, in one OffsetFetch request to its
    /// coordinator: of every partition it committed on (`partitions` `None`), or of
    /// `partitions` only. A partition without a committed offset is left out, and a group
    /// Kafka does not have has none. Offsets committed inside a transaction still open
    /// are not waited for. A partition Kafka reports an error for fails the call with
    /// Kafka's code, naming the partition. Duplicates are ignored.
    pub async fn list_consumer_group_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
    ) -> Result<BTreeMap<(String, i32), i64>, NativeError> {
        const OP: &str = "list consumer group offsets";
        let c_group = c_string("group", group)?;
        let partitions: Option<BTreeSet<(String, i32)>> =
            partitions.map(|p| p.iter().cloned().collect());
        // librdkafka refuses an empty list (None asks for every partition).
        if partitions.as_ref().is_some_and(BTreeSet::is_empty) {
            return Ok(BTreeMap::new());
        }
        for (topic, _) in partitions.iter().flatten() {
            c_string("topic", topic)?;
        }
        let group = group.to_string();
        let event = {
            let list = partitions.map(|partitions| {
                let mut list = rdkafka::TopicPartitionList::with_capacity(partitions.len());
                for (topic, partition) in &partitions {
                    list.add_partition(topic, *partition);
                }
                list
            });
            let list_ptr = list.as_ref().map_or(ptr::null(), |l| l.ptr().cast_const());
            // SAFETY: the name is NUL-terminated; the list is null (every partition) or
            // valid. Both are copied into the request object, which we own.
            let request_object = unsafe {
                Owned::new(
                    rd_kafka_ListConsumerGroupOffsets_new(c_group.as_ptr(), list_ptr),
                    rd_kafka_ListConsumerGroupOffsets_destroy,
                )
            }
            .ok_or_else(|| unexpected(OP, "librdkafka returned no request".into()))?;
            let mut ptrs = [request_object.as_ptr()];
            self.send(
                OP,
                Api::ListConsumerGroupOffsets,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: `ptrs` holds one valid request object that librdkafka
                    // copies; rk, options and queue are valid for the call.
                    unsafe {
                        rd_kafka_ListConsumerGroupOffsets(
                            rk,
                            ptrs.as_mut_ptr(),
                            ptrs.len(),
                            options,
                            queue,
                        )
                    }
                },
            )
            .map_err(|e| about_group(e, &group))?
        }
        .result()
        .await
        .map_err(|e| about_group(e, &group))?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is a ListConsumerGroupOffsets result,
        // which owns the group results, their errors and partition lists.
        let entries = unsafe {
            let result = rd_kafka_event_ListConsumerGroupOffsets_result(event.as_ptr());
            let results = c_array(
                rd_kafka_ListConsumerGroupOffsets_result_groups(result, &mut n),
                n,
            );
            group_result_partitions(OP, results, &group)?
        };
        let mut offsets = BTreeMap::new();
        let mut failed = Vec::new();
        for entry in entries {
            match entry.error {
                Some(error) => failed.push((entry.topic, entry.partition, error)),
                // A negative offset is librdkafka's "none committed".
                None if entry.offset >= 0 => {
                    offsets.insert((entry.topic, entry.partition), entry.offset);
                }
                None => {}
            }
        }
        match partition_refusal(OP, &group, failed) {
            Some(e) => Err(e),
            None => Ok(offsets),
        }
    }

    /// Sets the committed offsets of consumer group `group`: each `(topic, partition,
    /// offset)` becomes the offset the group resumes from there, in one OffsetCommit
    /// request to its coordinator; partitions not named keep theirs. Kafka takes this
    /// only while the group has no members ([`GroupState::Empty`], or
    /// [`GroupState::Dead`], which creates it): otherwise it refuses every partition with
    /// [`RDKafkaErrorCode::UnknownMemberId`]. A partition Kafka refuses fails the call
    /// with Kafka's code (the first refused partition's) and, in the message, every
    /// refused partition with the reason; the others may have been committed. Offsets
    /// must be at least 0, one per partition.
    pub async fn alter_consumer_group_offsets(
        &self,
        group: &str,
        offsets: &[(String, i32, i64)],
    ) -> Result<(), NativeError> {
        const OP: &str = "alter consumer group offsets";
        let c_group = c_string("group", group)?;
        let mut wanted: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for (topic, partition, offset) in offsets {
            c_string("topic", topic)?;
            if *offset < 0 {
                return Err(NativeError::InvalidArgument(format!(
                    "{OP}: offset {offset} of {topic} partition {partition} is negative"
                )));
            }
            match wanted.insert((topic.clone(), *partition), *offset) {
                Some(other) if other != *offset => {
                    return Err(NativeError::InvalidArgument(format!(
                        "{OP}: two offsets ({other}, {offset}) for {topic} partition \
                         {partition}"
                    )));
                }
                _ => {}
            }
        }
        // librdkafka refuses an empty request; nothing to change is success.
        if wanted.is_empty() {
            return Ok(());
        }
        let group = group.to_string();
        let event = {
            let mut list = rdkafka::TopicPartitionList::with_capacity(wanted.len());
            for ((topic, partition), offset) in &wanted {
                list.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))
                    .map_err(|e| NativeError::InvalidArgument(e.to_string()))?;
            }
            // SAFETY: the name is NUL-terminated and the list valid; both are copied into
            // the request object, which we own.
            let request_object = unsafe {
                Owned::new(
                    rd_kafka_AlterConsumerGroupOffsets_new(c_group.as_ptr(), list.ptr()),
                    rd_kafka_AlterConsumerGroupOffsets_destroy,
                )
            }
            .ok_or_else(|| unexpected(OP, "librdkafka returned no request".into()))?;
            let mut ptrs = [request_object.as_ptr()];
            self.send(
                OP,
                Api::AlterConsumerGroupOffsets,
                |_| Ok(()),
                |rk, options, queue| {
                    // SAFETY: `ptrs` holds one valid request object that librdkafka
                    // copies; rk, options and queue are valid for the call.
                    unsafe {
                        rd_kafka_AlterConsumerGroupOffsets(
                            rk,
                            ptrs.as_mut_ptr(),
                            ptrs.len(),
                            options,
                            queue,
                        )
                    }
                },
            )
            .map_err(|e| about_group(e, &group))?
        }
        .result()
        .await
        .map_err(|e| about_group(e, &group))?;
        let mut n = 0;
        // SAFETY: check_result() checked that this is an AlterConsumerGroupOffsets result,
        // which owns the group results, their errors and partition lists.
        let entries = unsafe {
            let result = rd_kafka_event_AlterConsumerGroupOffsets_result(event.as_ptr());
            let results = c_array(
                rd_kafka_AlterConsumerGroupOffsets_result_groups(result, &mut n),
                n,
            );
            group_result_partitions(OP, results, &group)?
        };
        let failed = entries
            .into_iter()
            .filter_map(|e| Some((e.topic, e.partition, e.error?)))
            .collect();
        match partition_refusal(OP, &group, failed) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends one admin request: `configure` sets request-specific options, then `send`
    /// calls the librdkafka function with the client, the options and the result queue.
    /// The C objects the request is built from may go once this returns (librdkafka
    /// copies them); await the returned [`Pending`] for the result.
    fn send(
        &self,
        op: &'static str,
        api: Api,
        configure: impl FnOnce(*mut rd_kafka_AdminOptions_t) -> Result<(), NativeError>,
        send: impl FnOnce(*mut rd_kafka_t, *const rd_kafka_AdminOptions_t, *mut rd_kafka_queue_t),
    ) -> Result<Pending, NativeError> {
        let d = &self.dispatch;
        let (admin_op, _) = api.codes();
        // Valid while `d.client` lives, which outlasts this function.
        let rk = d.client.inner().native_ptr();
        // SAFETY: rk is the live client handle; the request copies the options, so they
        // may go after `send`.
        let options = unsafe {
            Owned::new(
                rd_kafka_AdminOptions_new(rk, admin_op),
                rd_kafka_AdminOptions_destroy,
            )
        }
        .ok_or_else(|| unexpected(op, "librdkafka returned no admin options".into()))?;
        let timeout_ms = c_int::try_from(self.timeout.as_millis()).unwrap_or(c_int::MAX);
        let mut errstr = [0 as c_char; 256];
        // SAFETY: options is live; errstr is writable for its length.
        let err = unsafe {
            rd_kafka_AdminOptions_set_request_timeout(
                options.as_ptr(),
                timeout_ms,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            // SAFETY: librdkafka NUL-terminates errstr within its length.
            return Err(NativeError::InvalidArgument(unsafe {
                read_string(errstr.as_ptr())
            }));
        }
        configure(options.as_ptr())?;
        let id = d.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        d.pending.lock().expect("not poisoned").insert(id, tx);
        // SAFETY: options is live; the opaque is a number, never dereferenced.
        unsafe { rd_kafka_AdminOptions_set_opaque(options.as_ptr(), id as *mut c_void) };
        send(rk, options.as_ptr(), d.queue.as_ptr());
        Ok(Pending {
            op,
            api,
            id,
            rx,
            dispatch: d.clone(),
            // librdkafka answers with its own timeout error after the request timeout;
            // the margin lets that (more precise) answer arrive first.
            wait: self.timeout + Duration::from_secs(5),
        })
    }
}

/// The result queue every request of one client answers on, and the thread that polls
/// it and hands each result to the request that waits for it: no thread blocks per
/// request.
struct Dispatch {
    // Declared before `client`: a queue goes before its client.
    queue: Queue,
    client: Arc<Client>,
    /// The requests waiting, by the id each carries as its opaque.
    pending: std::sync::Mutex<HashMap<usize, tokio::sync::oneshot::Sender<Event>>>,
    next: AtomicUsize,
}

impl Dispatch {
    fn start(client: Arc<Client>) -> Arc<Self> {
        let rk = client.inner().native_ptr();
        // SAFETY: rk is the live client handle; `Dispatch` destroys the queue before it
        // lets go of the client.
        let queue = unsafe { Owned::new(rd_kafka_queue_new(rk), rd_kafka_queue_destroy) }
            .expect("librdkafka returned no queue (out of memory)");
        let dispatch = Arc::new(Self {
            queue: Queue(queue),
            client,
            pending: Default::default(),
            // Not 0: that is the opaque of an event without one.
            next: AtomicUsize::new(1),
        });
        let polled = dispatch.clone();
        std::thread::Builder::new()
            .name("kafka-admin-results".into())
            .spawn(move || polled.run())
            .expect("starting the Kafka admin result thread");
        dispatch
    }

    /// Hands out results until no `NativeAdmin` is left but this thread's.
    fn run(self: Arc<Self>) {
        while Arc::strong_count(&self) > 1 {
            // SAFETY: the queue is live; a polled event is ours to destroy.
            let Some(event) = (unsafe {
                Owned::new(
                    rd_kafka_queue_poll(self.queue.as_ptr(), 200),
                    rd_kafka_event_destroy,
                )
            }) else {
                continue;
            };
            // SAFETY: the event is live.
            let id = unsafe { rd_kafka_event_opaque(event.as_ptr()) } as usize;
            let waiting = self.pending.lock().expect("not poisoned").remove(&id);
            // A request no one waits for any more (timed out, or its caller went): the
            // event goes as `discard` says, here or when a failed send drops it.
            match waiting {
                Some(tx) => drop(tx.send(Event(Some(event)))),
                None => discard(event),
            }
        }
    }
}

/// A librdkafka queue, used from any thread (librdkafka queues are thread-safe).
struct Queue(Owned<rd_kafka_queue_t>);

// SAFETY: librdkafka's queue operations are thread-safe.
unsafe impl Send for Queue {}
// SAFETY: as above.
unsafe impl Sync for Queue {}

impl Queue {
    fn as_ptr(&self) -> *mut rd_kafka_queue_t {
        self.0.as_ptr()
    }
}

/// A result event, owned by whoever holds it; dropped unread, it goes by [`discard`].
struct Event(Option<Owned<rd_kafka_event_t>>);

impl Event {
    fn take(mut self) -> Owned<rd_kafka_event_t> {
        self.0.take().expect("an event is taken once")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Some(event) = self.0.take() {
            discard(event);
        }
    }
}

/// Destroys a result event no one reads, except one that destroying would crash on:
/// see the DescribeUserScramCredentials case in [`check_result`].
fn discard(event: Owned<rd_kafka_event_t>) {
    // SAFETY: the event is live.
    let (kind, err) = unsafe {
        (
            rd_kafka_event_type(event.as_ptr()),
            raw::rd_kafka_event_error(event.as_ptr()),
        )
    };
    if kind == Api::DescribeScram.codes().1 && err > 0 {
        std::mem::forget(event);
    }
}

// SAFETY: an event is read and destroyed by one owner at a time, from any thread;
// librdkafka ties it to no thread.
unsafe impl Send for Event {}

/// A request sent, waiting for its result.
struct Pending {
    op: &'static str,
    api: Api,
    id: usize,
    rx: tokio::sync::oneshot::Receiver<Event>,
    dispatch: Arc<Dispatch>,
    wait: Duration,
}

impl Pending {
    /// The result event, only if it is of the expected type and carries no
    /// request-level error.
    async fn result(self) -> Result<Owned<rd_kafka_event_t>, NativeError> {
        let op = self.op;
        match tokio::time::timeout(self.wait, self.rx).await {
            Ok(Ok(event)) => check_result(op, self.api, event.take()),
            Ok(Err(_)) => Err(NativeError::Cancelled { op }),
            Err(_) => {
                (self.dispatch.pending.lock().expect("not poisoned")).remove(&self.id);
                Err(NativeError::Timeout { op })
            }
        }
    }
}

/// A C object freed by its librdkafka destructor when dropped.
struct Owned<T> {
    ptr: NonNull<T>,
    free: unsafe extern "C" fn(*mut T),
}

impl<T> Owned<T> {
    /// Takes ownership of `ptr`; `None` if it is null.
    ///
    /// # Safety
    /// `ptr` must be null or a live object that nothing else frees and that `free`
    /// destroys.
    unsafe fn new(ptr: *mut T, free: unsafe extern "C" fn(*mut T)) -> Option<Self> {
        NonNull::new(ptr).map(|ptr| Self { ptr, free })
    }

    fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: we own the object (see `new`) and free it exactly once.
        unsafe { (self.free)(self.ptr.as_ptr()) }
    }
}

/// The admin APIs used here, with the event type each answers with.
#[derive(Clone, Copy)]
enum Api {
    CreateAcls,
    DescribeAcls,
    DeleteAcls,
    AlterScram,
    DescribeScram,
    DescribeCluster,
    ListOffsets,
    CreateTopics,
    DescribeTopics,
    IncrementalAlterConfigs,
    DescribeConfigs,
    DescribeConsumerGroups,
    ListConsumerGroupOffsets,
    AlterConsumerGroupOffsets,
}

impl Api {
    fn codes(self) -> (rd_kafka_admin_op_t, rd_kafka_event_type_t) {
        use rd_kafka_admin_op_t::*;
        match self {
            Api::CreateAcls => (
                RD_KAFKA_ADMIN_OP_CREATEACLS,
                RD_KAFKA_EVENT_CREATEACLS_RESULT,
            ),
            Api::DescribeAcls => (
                RD_KAFKA_ADMIN_OP_DESCRIBEACLS,
                RD_KAFKA_EVENT_DESCRIBEACLS_RESULT,
            ),
            Api::DeleteAcls => (
                RD_KAFKA_ADMIN_OP_DELETEACLS,
                RD_KAFKA_EVENT_DELETEACLS_RESULT,
            ),
            Api::AlterScram => (
                RD_KAFKA_ADMIN_OP_ALTERUSERSCRAMCREDENTIALS,
                RD_KAFKA_EVENT_ALTERUSERSCRAMCREDENTIALS_RESULT,
            ),
            Api::DescribeScram => (
                RD_KAFKA_ADMIN_OP_DESCRIBEUSERSCRAMCREDENTIALS,
                RD_KAFKA_EVENT_DESCRIBEUSERSCRAMCREDENTIALS_RESULT,
            ),
            Api::DescribeCluster => (
                RD_KAFKA_ADMIN_OP_DESCRIBECLUSTER,
                RD_KAFKA_EVENT_DESCRIBECLUSTER_RESULT,
            ),
            Api::ListOffsets => (
                RD_KAFKA_ADMIN_OP_LISTOFFSETS,
                RD_KAFKA_EVENT_LISTOFFSETS_RESULT,
            ),
            Api::CreateTopics => (
                RD_KAFKA_ADMIN_OP_CREATETOPICS,
                RD_KAFKA_EVENT_CREATETOPICS_RESULT,
            ),
            Api::DescribeTopics => (
                RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
                RD_KAFKA_EVENT_DESCRIBETOPICS_RESULT,
            ),
            Api::IncrementalAlterConfigs => (
                RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
                RD_KAFKA_EVENT_INCREMENTALALTERCONFIGS_RESULT,
            ),
            Api::DescribeConfigs => (
                RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS,
                RD_KAFKA_EVENT_DESCRIBECONFIGS_RESULT,
            ),
            Api::DescribeConsumerGroups => (
                RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
                RD_KAFKA_EVENT_DESCRIBECONSUMERGROUPS_RESULT,
            ),
            Api::ListConsumerGroupOffsets => (
                RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS,
                RD_KAFKA_EVENT_LISTCONSUMERGROUPOFFSETS_RESULT,
            ),
            Api::AlterConsumerGroupOffsets => (
                RD_KAFKA_ADMIN_OP_ALTERCONSUMERGROUPOFFSETS,
                RD_KAFKA_EVENT_ALTERCONSUMERGROUPOFFSETS_RESULT,
            ),
        }
    }
}

/// `event` if it is of `api`'s result type and carries no request-level error.
fn check_result(
    op: &'static str,
    api: Api,
    event: Owned<rd_kafka_event_t>,
) -> Result<Owned<rd_kafka_event_t>, NativeError> {
    let (_, event_type) = api.codes();
    // SAFETY: the event is live.
    let err = unsafe { raw::rd_kafka_event_error(event.as_ptr()) };
    if matches!(api, Api::DescribeScram) && err > 0 {
        // librdkafka 2.12's DescribeUserScramCredentials response parser stores a
        // request-level broker error's string from a stack buffer (or a static string)
        // in the result, which destroying the event then frees: reading it is a
        // use-after-return and destroying it aborts the process ("munmap_chunk():
        // invalid pointer"). The event is therefore leaked (a few hundred bytes, on this
        // error path only) and the error told by its code alone.
        std::mem::forget(event);
        return Err(match kafka_error(err, String::new()) {
            Some((code, _)) => refused(op, code, format!("{code}")),
            None => unexpected(op, "an error code of 0".into()),
        });
    }
    // SAFETY: the event is live; its error string lives as long as it does.
    let (err, message) = unsafe {
        let err = raw::rd_kafka_event_error(event.as_ptr());
        (
            err,
            read_string(rd_kafka_event_error_string(event.as_ptr())),
        )
    };
    match kafka_error(err, message) {
        None => {}
        Some((RDKafkaErrorCode::OperationTimedOut, _)) => {
            return Err(NativeError::Timeout { op });
        }
        Some((RDKafkaErrorCode::InvalidArgument, message)) => {
            return Err(NativeError::InvalidArgument(format!("{op}: {message}")));
        }
        Some((code, message)) => return Err(refused(op, code, message)),
    }
    // SAFETY: the event is live.
    let actual = unsafe { rd_kafka_event_type(event.as_ptr()) };
    if actual != event_type {
        return Err(unexpected(
            op,
            format!("event type {actual}, expected {event_type}"),
        ));
    }
    Ok(event)
}

/// The per-user error of an AlterUserScramCredentials result for one user, if any.
fn alter_scram_result(
    op: &'static str,
    event: &Owned<rd_kafka_event_t>,
) -> Result<(), NativeError> {
    let mut n = 0;
    // SAFETY: check_result() checked that this is an AlterUserScramCredentials result, which
    // owns the array and the responses' errors.
    unsafe {
        let result = rd_kafka_event_AlterUserScramCredentials_result(event.as_ptr());
        let responses = c_array(
            rd_kafka_AlterUserScramCredentials_result_responses(result, &mut n),
            n,
        );
        if responses.len() != 1 {
            return Err(unexpected(op, format!("{n} responses for one user")));
        }
        match item_error(rd_kafka_AlterUserScramCredentials_result_response_error(
            responses[0],
        )) {
            Some((code, message)) => Err(refused(op, code, message)),
            None => Ok(()),
        }
    }
}

/// The fields of an ACL binding or filter, as C strings and C enums; `None` strings
/// (filters only) match anything.
struct CAcl {
    resource_type: rd_kafka_ResourceType_t,
    name: Option<CString>,
    pattern_type: rd_kafka_ResourcePatternType_t,
    principal: Option<CString>,
    host: Option<CString>,
    operation: rd_kafka_AclOperation_t,
    permission: rd_kafka_AclPermissionType_t,
}

impl TryFrom<&AclBinding> for CAcl {
    type Error = NativeError;
    fn try_from(b: &AclBinding) -> Result<Self, NativeError> {
        Ok(Self {
            resource_type: b.resource_type.into(),
            name: Some(c_string("resource name", &b.resource_name)?),
            pattern_type: b.pattern_type.into(),
            principal: Some(c_string("principal", &b.principal)?),
            host: Some(c_string("host", &b.host)?),
            operation: b.operation.into(),
            permission: b.permission.into(),
        })
    }
}

impl TryFrom<&AclFilter> for CAcl {
    type Error = NativeError;
    fn try_from(f: &AclFilter) -> Result<Self, NativeError> {
        let opt = |what, s: &Option<String>| s.as_deref().map(|s| c_string(what, s)).transpose();
        Ok(Self {
            resource_type: f
                .resource_type
                .map_or(rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_ANY, Into::into),
            name: opt("resource name", &f.resource_name)?,
            pattern_type: f.pattern_type.into(),
            principal: opt("principal", &f.principal)?,
            host: opt("host", &f.host)?,
            operation: f.operation.map_or(
                rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_ANY,
                Into::into,
            ),
            permission: f.permission.map_or(
                rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ANY,
                Into::into,
            ),
        })
    }
}

/// Builds a C ACL binding (`binding`) or filter (`!binding`); librdkafka's validation
/// errors become [`NativeError::InvalidArgument`].
fn new_acl(acl: CAcl, binding: bool) -> Result<Owned<rd_kafka_AclBinding_t>, NativeError> {
    let s = |s: &Option<CString>| s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
    let new = if binding {
        rd_kafka_AclBinding_new
    } else {
        rd_kafka_AclBindingFilter_new
    };
    let mut errstr = [0 as c_char; 256];
    // SAFETY: the strings are NUL-terminated (or null, which filters accept and
    // bindings reject with an error) and copied by the call; errstr is writable for its
    // length.
    let ptr = unsafe {
        new(
            acl.resource_type,
            s(&acl.name),
            acl.pattern_type,
            s(&acl.principal),
            s(&acl.host),
            acl.operation,
            acl.permission,
            errstr.as_mut_ptr(),
            errstr.len(),
        )
    };
    // SAFETY: a fresh binding, owned by no one else; filters are bindings in C.
    match unsafe { Owned::new(ptr, rd_kafka_AclBinding_destroy) } {
        Some(acl) => Ok(acl),
        // SAFETY: on failure librdkafka wrote a NUL-terminated message into errstr.
        None => Err(NativeError::InvalidArgument(unsafe {
            read_string(errstr.as_ptr())
        })),
    }
}

/// Copies a user's SCRAM description librdkafka returned.
///
/// # Safety
/// `d` must be a live description.
unsafe fn read_scram_user(
    op: &'static str,
    d: *const rd_kafka_UserScramCredentialsDescription_t,
) -> Result<(String, Vec<ScramCredential>), NativeError> {
    // SAFETY: `d` is live (see the contract), and so are its user, error and credential
    // infos.
    unsafe {
        let user = read_string(rd_kafka_UserScramCredentialsDescription_user(d));
        match item_error(rd_kafka_UserScramCredentialsDescription_error(d)) {
            // Kafka's answer for a user without credentials.
            Some((RDKafkaErrorCode::ResourceNotFound, _)) => return Ok((user, Vec::new())),
            Some((code, message)) => {
                return Err(refused(op, code, format!("{message} (user {user})")));
            }
            None => {}
        }
        let count = rd_kafka_UserScramCredentialsDescription_scramcredentialinfo_count(d);
        let mut credentials = Vec::with_capacity(count);
        for i in 0..count {
            let info = rd_kafka_UserScramCredentialsDescription_scramcredentialinfo(d, i);
            let raw = scram_mechanism_raw(info);
            let mechanism = scram_mechanism(raw)
                .ok_or_else(|| unexpected(op, format!("SCRAM mechanism {raw} of user {user}")))?;
            let iterations = rd_kafka_ScramCredentialInfo_iterations(info);
            credentials.push(ScramCredential {
                mechanism,
                iterations,
            });
        }
        Ok((user, credentials))
    }
}

fn scram_mechanism(raw: c_uint) -> Option<ScramMechanism> {
    ScramMechanism::ALL
        .iter()
        .copied()
        .find(|m| rd_kafka_ScramMechanism_t::from(*m) as c_uint == raw)
}

/// Copies a binding librdkafka returned.
///
/// # Safety
/// `acl` must be a live binding.
unsafe fn read_acl(
    op: &'static str,
    acl: *const rd_kafka_AclBinding_t,
) -> Result<AclBinding, NativeError> {
    // librdkafka maps values it does not know to UNKNOWN, which has no Rust variant.
    let known = |what: &str, v: &dyn std::fmt::Debug| unexpected(op, format!("ACL {what} {v:?}"));
    // SAFETY: `acl` is live (see the contract); the strings it returns live as long.
    unsafe {
        Ok(AclBinding {
            resource_type: ResourceType::try_from(rd_kafka_AclBinding_restype(acl))
                .map_err(|v| known("resource type", &v))?,
            resource_name: read_string(rd_kafka_AclBinding_name(acl)),
            pattern_type: PatternType::try_from(rd_kafka_AclBinding_resource_pattern_type(acl))
                .map_err(|v| known("pattern type", &v))?,
            principal: read_string(rd_kafka_AclBinding_principal(acl)),
            host: read_string(rd_kafka_AclBinding_host(acl)),
            operation: AclOperation::try_from(rd_kafka_AclBinding_operation(acl))
                .map_err(|v| known("operation", &v))?,
            permission: AclPermission::try_from(rd_kafka_AclBinding_permission_type(acl))
                .map_err(|v| known("permission", &v))?,
        })
    }
}

/// The code and message of a per-item error; `None` if there is none.
///
/// # Safety
/// `error` must be null or a live error.
unsafe fn item_error(error: *const rd_kafka_error_t) -> Option<(RDKafkaErrorCode, String)> {
    if error.is_null() {
        return None;
    }
    // SAFETY: `error` is live (see the contract); its string lives as long.
    let (code, message) = unsafe {
        (
            raw::rd_kafka_error_code(error),
            read_string(rd_kafka_error_string(error)),
        )
    };
    // librdkafka sometimes attaches an error object carrying NO_ERROR.
    kafka_error(code, message)
}

/// An error code as librdkafka returned it, classified: `None` for no error, and
/// [`RDKafkaErrorCode::Unknown`] (with the number added to the message) for a code this
/// binding does not know, such as one from a newer broker.
fn kafka_error(code: c_int, message: String) -> Option<(RDKafkaErrorCode, String)> {
    match rd_kafka_resp_err_t::try_from(code) {
        Ok(rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR) => None,
        Ok(known) => Some((known.into(), message)),
        Err(_) => Some((
            RDKafkaErrorCode::Unknown,
            format!("{message} (Kafka error code {code})"),
        )),
    }
}

/// A consumer group's state as librdkafka returned it (see `raw`); a value without a
/// Rust variant is [`GroupState::Unknown`].
fn group_state(raw: c_int) -> GroupState {
    GroupState::ALL
        .iter()
        .copied()
        .find(|s| rd_kafka_consumer_group_state_t::from(*s) as c_int == raw)
        .unwrap_or(GroupState::Unknown)
}

/// One partition of a group result: its offset, and Kafka's error for it, if any.
struct GroupPartition {
    topic: String,
    partition: i32,
    offset: i64,
    error: Option<(RDKafkaErrorCode, String)>,
}

/// The partitions of the one group result librdkafka returns for a request about
/// `group`, or its group-level error.
///
/// # Safety
/// `results` must be live group results.
unsafe fn group_result_partitions(
    op: &'static str,
    results: &[*const rd_kafka_group_result_t],
    group: &str,
) -> Result<Vec<GroupPartition>, NativeError> {
    let [result] = results else {
        return Err(unexpected(
            op,
            format!("{} results for one group", results.len()),
        ));
    };
    // SAFETY: the result is live (see the contract), and so are its name, error and
    // partition list, whose `cnt` elements are initialised.
    unsafe {
        let name = read_string(rd_kafka_group_result_name(*result));
        if name != group {
            return Err(unexpected(
                op,
                format!("a result for group {name:?}, not {group:?}"),
            ));
        }
        if let Some((code, message)) = item_error(rd_kafka_group_result_error(*result)) {
            return Err(group_refusal(op, code, message, group));
        }
        let list = rd_kafka_group_result_partitions(*result);
        if list.is_null() || (*list).cnt <= 0 || (*list).elems.is_null() {
            return Ok(Vec::new());
        }
        let elems = std::slice::from_raw_parts((*list).elems, (*list).cnt as usize);
        Ok(elems
            .iter()
            .map(|p| {
                // Read the error as the int it is (see `raw`).
                let code = ptr::addr_of!(p.err).cast::<c_int>().read();
                GroupPartition {
                    topic: read_string(p.topic),
                    partition: p.partition,
                    offset: p.offset,
                    error: kafka_error(code, String::new()),
                }
            })
            .collect())
    }
}

/// Kafka's group-level answer `code` to `op` on `group`; a request that got no answer
/// in time is a [`NativeError::Timeout`], as in [`request`].
fn group_refusal(
    op: &'static str,
    code: RDKafkaErrorCode,
    message: String,
    group: &str,
) -> NativeError {
    match code {
        RDKafkaErrorCode::OperationTimedOut => NativeError::Timeout { op },
        _ => refused(
            op,
            code,
            format!("{} (group {group})", or_code(message, code)),
        ),
    }
}

/// `e`, naming `group` if it is Kafka's refusal (librdkafka's messages for a request
/// that failed as a whole do not).
fn about_group(e: NativeError, group: &str) -> NativeError {
    match e {
        NativeError::Kafka { op, code, message } => {
            refused(op, code, format!("{message} (group {group})"))
        }
        other => other,
    }
}

/// The refusal of the partitions in `failed` (topic, partition, Kafka's error): the
/// first one's code, and every one with its reason in the message. `None` if none
/// failed.
fn partition_refusal(
    op: &'static str,
    group: &str,
    mut failed: Vec<(String, i32, (RDKafkaErrorCode, String))>,
) -> Option<NativeError> {
    failed.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let code = failed.first()?.2.0;
    let each: Vec<String> = failed
        .into_iter()
        .map(|(topic, partition, (code, message))| {
            format!("{topic} partition {partition}: {}", or_code(message, code))
        })
        .collect();
    Some(refused(
        op,
        code,
        format!("group {group}: {}", each.join("; ")),
    ))
}

/// `message`, or (Kafka's partition-level errors carry none) librdkafka's description
/// of `code`, such as "UnknownMemberId (Broker: Unknown member)".
fn or_code(message: String, code: RDKafkaErrorCode) -> String {
    if message.is_empty() {
        code.to_string()
    } else {
        message
    }
}

/// Sets the validate-only option.
fn set_validate_only(
    options: *mut rd_kafka_AdminOptions_t,
    validate_only: bool,
) -> Result<(), NativeError> {
    let mut errstr = [0 as c_char; 256];
    // SAFETY: options is live for the call; errstr is writable for its length.
    let err = unsafe {
        rd_kafka_AdminOptions_set_validate_only(
            options,
            c_int::from(validate_only),
            errstr.as_mut_ptr(),
            errstr.len(),
        )
    };
    if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: librdkafka NUL-terminates errstr within its length.
        return Err(NativeError::InvalidArgument(unsafe {
            read_string(errstr.as_ptr())
        }));
    }
    Ok(())
}

/// Sets the operation timeout: how long the broker waits for the operation to finish.
fn set_operation_timeout(
    options: *mut rd_kafka_AdminOptions_t,
    timeout: Duration,
) -> Result<(), NativeError> {
    let timeout_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    let mut errstr = [0 as c_char; 256];
    // SAFETY: options is live for the call; errstr is writable for its length.
    let err = unsafe {
        rd_kafka_AdminOptions_set_operation_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        )
    };
    if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: librdkafka NUL-terminates errstr within its length.
        return Err(NativeError::InvalidArgument(unsafe {
            read_string(errstr.as_ptr())
        }));
    }
    Ok(())
}

/// librdkafka's functions that return an error code, declared returning the C `int`
/// the code is. The bindings declare them returning a Rust enum, and a code the enum
/// lacks (a broker newer than the binding may send one) would be undefined behaviour.
mod raw {
    use std::ffi::c_int;

    use rdkafka_sys::bindings::{
        rd_kafka_ConfigEntry_t, rd_kafka_ConfigResource_t, rd_kafka_ConsumerGroupDescription_t,
        rd_kafka_error_t, rd_kafka_event_t, rd_kafka_topic_result_t,
    };

    // SAFETY: same symbols and ABI as the bindings' declarations; C enums are ints.
    unsafe extern "C" {
        pub fn rd_kafka_event_error(rkev: *mut rd_kafka_event_t) -> c_int;
        pub fn rd_kafka_error_code(error: *const rd_kafka_error_t) -> c_int;
        pub fn rd_kafka_ConfigResource_error(config: *const rd_kafka_ConfigResource_t) -> c_int;
        // A source, not an error code: an int, so that a source this binding does not
        // know is no invalid enum value.
        pub fn rd_kafka_ConfigEntry_source(entry: *const rd_kafka_ConfigEntry_t) -> c_int;
        pub fn rd_kafka_topic_result_error(topicres: *const rd_kafka_topic_result_t) -> c_int;
        // A state, not an error code, but read as an int for the same reason.
        pub fn rd_kafka_ConsumerGroupDescription_state(
            grpdesc: *const rd_kafka_ConsumerGroupDescription_t,
        ) -> c_int;
    }
}

/// A librdkafka result array as a slice; empty if null.
///
/// # Safety
/// `ptr` must be null or point to `len` elements that outlive `'a`.
unsafe fn c_array<'a, T>(ptr: *mut *const T, len: usize) -> &'a [*const T] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: see the contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// Copies a C string; null becomes empty and invalid UTF-8 is replaced.
///
/// # Safety
/// `s` must be null or a live NUL-terminated string.
unsafe fn read_string(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: see the contract.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// `rd_kafka_ScramCredentialInfo_mechanism` as a plain integer.
///
/// # Safety
/// `info` must be a live credential info.
unsafe fn scram_mechanism_raw(info: *const rd_kafka_ScramCredentialInfo_t) -> c_uint {
    // librdkafka copies Kafka's mechanism byte unchecked, and a value outside the Rust
    // binding's enum would be undefined behaviour, so read it as the int it is in C.
    unsafe extern "C" {
        #[link_name = "rd_kafka_ScramCredentialInfo_mechanism"]
        fn mechanism(info: *const rd_kafka_ScramCredentialInfo_t) -> c_uint;
    }
    // SAFETY: see the contract; same symbol and ABI as the binding, C enums being ints.
    unsafe { mechanism(info) }
}

fn c_string(what: &str, s: &str) -> Result<CString, NativeError> {
    CString::new(s)
        .map_err(|_| NativeError::InvalidArgument(format!("{what} {s:?} contains a NUL byte")))
}

fn refused(op: &'static str, code: RDKafkaErrorCode, message: String) -> NativeError {
    NativeError::Kafka { op, code, message }
}

fn unexpected(op: &'static str, what: String) -> NativeError {
    NativeError::Unexpected { op, what }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Rust variant survives the trip to C and back, and distinct variants map to
    /// distinct C values.
    fn round_trips<R, C>(all: &[R])
    where
        R: Copy + std::fmt::Debug + PartialEq + Into<C> + TryFrom<C>,
        C: Copy + std::fmt::Debug + PartialEq,
        <R as TryFrom<C>>::Error: std::fmt::Debug,
    {
        let cs: Vec<C> = all.iter().map(|r| (*r).into()).collect();
        for (r, c) in all.iter().zip(&cs) {
            assert_eq!(R::try_from(*c).ok(), Some(*r), "{r:?} <-> {c:?}");
            assert_eq!(cs.iter().filter(|x| *x == c).count(), 1, "{c:?} used twice");
        }
    }

    #[test]
    fn enums_round_trip() {
        round_trips::<_, rd_kafka_ResourceType_t>(ResourceType::ALL);
        round_trips::<_, rd_kafka_ResourcePatternType_t>(PatternType::ALL);
        round_trips::<_, rd_kafka_ResourcePatternType_t>(PatternTypeFilter::ALL);
        round_trips::<_, rd_kafka_AclOperation_t>(AclOperation::ALL);
        round_trips::<_, rd_kafka_AclPermissionType_t>(AclPermission::ALL);
        round_trips::<_, rd_kafka_ScramMechanism_t>(ScramMechanism::ALL);
        round_trips::<_, rd_kafka_consumer_group_state_t>(GroupState::ALL);
        assert_eq!(AclOperation::ALL.len(), 11);
    }

    #[test]
    fn group_states_librdkafka_may_add_are_unknown() {
        use rd_kafka_consumer_group_state_t::*;
        assert_eq!(
            GroupState::ALL.len(),
            RD_KAFKA_CONSUMER_GROUP_STATE__CNT as usize
        );
        assert_eq!(
            group_state(RD_KAFKA_CONSUMER_GROUP_STATE_EMPTY as c_int),
            GroupState::Empty
        );
        assert_eq!(
            group_state(RD_KAFKA_CONSUMER_GROUP_STATE_DEAD as c_int),
            GroupState::Dead
        );
        assert_eq!(
            group_state(RD_KAFKA_CONSUMER_GROUP_STATE__CNT as c_int),
            GroupState::Unknown
        );
        assert_eq!(group_state(-1), GroupState::Unknown);
    }

    #[test]
    fn partition_refusals_carry_the_first_code_and_every_partition() {
        assert!(partition_refusal("op", "g", Vec::new()).is_none());
        let member = RDKafkaErrorCode::UnknownMemberId;
        let auth = RDKafkaErrorCode::TopicAuthorizationFailed;
        let err = partition_refusal(
            "op",
            "g",
            vec![
                ("b".into(), 0, (auth, String::new())),
                ("a".into(), 1, (member, String::new())),
                ("a".into(), 0, (member, "said".into())),
            ],
        )
        .expect("refused");
        let NativeError::Kafka { code, message, .. } = err else {
            panic!("{err}");
        };
        assert_eq!(code, member);
        assert_eq!(
            message,
            format!("group g: a partition 0: said; a partition 1: {member}; b partition 0: {auth}")
        );
        assert!(message.contains("Unknown member"), "{message}");
    }

    #[test]
    fn c_values_without_a_rust_variant_are_rejected() {
        use rd_kafka_AclOperation_t::*;
        use rd_kafka_ResourcePatternType_t::*;
        use rd_kafka_ResourceType_t::*;
        assert!(ResourceType::try_from(RD_KAFKA_RESOURCE_ANY).is_err());
        assert!(ResourceType::try_from(RD_KAFKA_RESOURCE_UNKNOWN).is_err());
        assert!(PatternType::try_from(RD_KAFKA_RESOURCE_PATTERN_MATCH).is_err());
        assert!(PatternType::try_from(RD_KAFKA_RESOURCE_PATTERN_ANY).is_err());
        assert!(AclOperation::try_from(RD_KAFKA_ACL_OPERATION_ANY).is_err());
        assert!(AclOperation::try_from(RD_KAFKA_ACL_OPERATION_UNKNOWN).is_err());
        assert!(
            ScramMechanism::try_from(rd_kafka_ScramMechanism_t::RD_KAFKA_SCRAM_MECHANISM_UNKNOWN)
                .is_err()
        );
        assert_eq!(scram_mechanism(2), Some(ScramMechanism::Sha512));
        assert_eq!(scram_mechanism(0), None);
        assert_eq!(scram_mechanism(7), None);
    }

    fn binding() -> AclBinding {
        AclBinding {
            resource_type: ResourceType::Topic,
            resource_name: "orders.".into(),
            pattern_type: PatternType::Prefixed,
            principal: "User:alice".into(),
            host: "*".into(),
            operation: AclOperation::Read,
            permission: AclPermission::Allow,
        }
    }

    #[test]
    fn bindings_and_filters_survive_librdkafka() {
        let b = binding();
        let c = new_acl((&b).try_into().unwrap(), true).expect("valid binding");
        // SAFETY: `c` is live.
        assert_eq!(unsafe { read_acl("test", c.as_ptr()) }.unwrap(), b);
        // An exact filter is a valid filter; a principal-only one leaves the rest null.
        new_acl((&AclFilter::from(&b)).try_into().unwrap(), false).expect("valid filter");
        new_acl(
            (&AclFilter::principal("User:alice")).try_into().unwrap(),
            false,
        )
        .expect("valid filter");
    }

    #[test]
    fn nul_bytes_are_invalid_arguments() {
        let b = AclBinding {
            principal: "User:a\0b".into(),
            ..binding()
        };
        let err = CAcl::try_from(&b).err().expect("rejected");
        assert!(
            matches!(err, NativeError::InvalidArgument(ref m) if m.contains("principal")),
            "{err}"
        );
        assert!(matches!(
            c_string("user", "a\0"),
            Err(NativeError::InvalidArgument(_))
        ));
    }
}
