//! The operator as a platform team installs it: its own SCRAM user holding exactly the
//! Kafka ACLs the README lists, not the super user. Kafka's own tools (`ConfigCommand`,
//! `AclCommand`) make the user and its grants.

use crate::{OperatorHandle, TestEnv, unique};

/// A resource an operator ACL is on, as `AclCommand` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclResource {
    /// The cluster.
    Cluster,
    /// Every topic (the literal wildcard `*`): the operator manages whatever topic names
    /// its EventTopics ask for.
    AnyTopic,
    /// Every consumer group (the literal wildcard `*`): the operator describes groups and
    /// reads and rewinds their committed offsets, whatever group ids ConsumerGroups use,
    /// and a Redrive reads in a group of its own.
    AnyGroup,
    /// Transactional ids that start with this prefix.
    TransactionalIdPrefix(&'static str),
}

impl AclResource {
    fn args(self) -> Vec<String> {
        match self {
            AclResource::Cluster => vec!["--cluster".into()],
            AclResource::AnyTopic => vec!["--topic".into(), "*".into()],
            AclResource::AnyGroup => vec!["--group".into(), "*".into()],
            AclResource::TransactionalIdPrefix(p) => vec![
                "--transactional-id".into(),
                p.into(),
                "--resource-pattern-type".into(),
                "prefixed".into(),
            ],
        }
    }
}

/// Exactly the ACLs README.md and charts/eventops/README.md list for the operator's
/// Kafka user, as (resource, operation). Kafka implies Describe from Alter, Delete or
/// Read and DescribeConfigs from AlterConfigs, so those are not listed.
pub const OPERATOR_ACLS: &[(AclResource, &str)] = &[
    (AclResource::Cluster, "Alter"),
    (AclResource::AnyTopic, "Create"),
    (AclResource::AnyTopic, "Delete"),
    (AclResource::AnyTopic, "Alter"),
    (AclResource::AnyTopic, "AlterConfigs"),
    (AclResource::AnyTopic, "Read"),
    (AclResource::AnyTopic, "Write"),
    (AclResource::AnyGroup, "Read"),
    (
        AclResource::TransactionalIdPrefix("eventops-redrive."),
        "Write",
    ),
];

/// A SCRAM-SHA-512 user of its own for an operator under test.
#[derive(Clone, Debug)]
pub struct OperatorUser {
    /// The user name.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl OperatorUser {
    /// `User:<name>`.
    pub fn principal(&self) -> String {
        format!("User:{}", self.user)
    }
}

impl TestEnv {
    /// Creates a fresh SCRAM-SHA-512 user with `ConfigCommand`, holding no ACL yet.
    pub async fn create_operator_user(&self) -> OperatorUser {
        let user = OperatorUser {
            user: unique("eventops-operator"),
            password: unique("secret"),
        };
        let config = format!("SCRAM-SHA-512=[iterations=4096,password={}]", user.password);
        self.kafka_tool(
            "kafka.admin.ConfigCommand",
            &[
                "--alter",
                "--add-config",
                &config,
                "--entity-type",
                "users",
                "--entity-name",
                &user.user,
            ],
        )
        .await
        .expect("creating the operator's SCRAM user");
        user
    }

    /// Adds (`add`) or removes allow ACLs of `principal` with `AclCommand`.
    pub async fn set_acls(
        &self,
        add: bool,
        principal: &str,
        resource: AclResource,
        operations: &[&str],
    ) {
        let mut args: Vec<String> = if add {
            vec!["--add".into(), "--allow-principal".into()]
        } else {
            vec![
                "--remove".into(),
                "--force".into(),
                "--allow-principal".into(),
            ]
        };
        args.push(principal.into());
        for op in operations {
            args.push("--operation".into());
            args.push((*op).into());
        }
        args.extend(resource.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.kafka_tool("org.apache.kafka.tools.AclCommand", &args)
            .await
            .unwrap_or_else(|e| panic!("AclCommand {args:?}: {e:#}"));
    }

    /// Grants `user` exactly [`OPERATOR_ACLS`].
    pub async fn grant_operator_acls(&self, user: &OperatorUser) {
        let mut resources: Vec<AclResource> = OPERATOR_ACLS.iter().map(|(r, _)| *r).collect();
        resources.dedup();
        for resource in resources {
            let ops: Vec<&str> = OPERATOR_ACLS
                .iter()
                .filter(|(r, _)| *r == resource)
                .map(|(_, op)| *op)
                .collect();
            self.set_acls(true, &user.principal(), resource, &ops).await;
        }
    }

    /// Starts the operator in this process as `user` (the super user when `None`),
    /// watching `namespace` (all namespaces when `None`), with a short resync interval.
    /// It stops when the handle is dropped.
    pub fn start_operator_as(
        &self,
        namespace: Option<&str>,
        user: Option<&OperatorUser>,
    ) -> OperatorHandle {
        self.start_operator_config(namespace, &self.info.kafka_bootstrap, user)
    }
}
