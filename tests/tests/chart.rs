//! The Helm chart, checked for real: `helm lint`, the values schema, a server-side dry run
//! of the rendered manifests, and `helm install` into the local API server (RBAC on) with
//! the operator running under the chart's ServiceAccount and RBAC, as its Deployment
//! configures it. Removing any one of the chart's RBAC rules breaks it. Re-applying the
//! same manifests (GitOps resyncs, `helm upgrade`) writes nothing. The chart's own
//! Deployment also runs as two pods on the local node and reconciles.

use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_tests::chart::{ChartOperator, chart_dir};
use eventops_tests::{HasConditions, TestEnv, env, eventually, free_port, unique};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::PostParams;
use kube::{Api, ResourceExt};

/// Every optional part of the chart turned on.
const EVERYTHING: &str = "serviceMonitor.enabled=true,prometheusRule.enabled=true,\
grafanaDashboard.enabled=true,kafka.sasl.secretName=kafka-user,kafka.tls.enabled=true,\
kafka.tls.caSecret.name=kafka-ca,kafka.properties.client\\.id=eventops,logLevel=debug,\
topicNamingPattern=^[a-z.]+$";

fn chart() -> String {
    chart_dir().display().to_string()
}

#[tokio::test]
async fn helm_lint_passes_with_defaults_and_every_option() {
    let env = env().await;
    let bootstrap = "kafka.bootstrapServers=kafka:9092";
    env.helm(&["lint", "--strict", &chart(), "--set", bootstrap])
        .expect_ok("helm lint");
    env.helm(&[
        "lint",
        "--strict",
        &chart(),
        "--set",
        bootstrap,
        "--set",
        EVERYTHING,
        "--set",
        "watchNamespace=apps",
    ])
    .expect_ok("helm lint with every option");
}

#[tokio::test]
async fn values_schema_and_chart_reject_bad_values_naming_them() {
    let env = env().await;
    let ok = "kafka.bootstrapServers=kafka:9092";
    let cases = [
        // (values, text the error must contain)
        (
            "image.pullPolicy=Always".to_string(),
            "/kafka/bootstrapServers",
        ),
        (
            "kafka.bootstrapServers=kafka".into(),
            "/kafka/bootstrapServers",
        ),
        ("kafka.bootstrapsServers=k:9092".into(), "bootstrapsServers"),
        (format!("{ok},replicaCount=two"), "/replicaCount"),
        (format!("{ok},resyncInterval=soon"), "/resyncInterval"),
        (
            format!("{ok},kafka.securityProtocol=SASL"),
            "/kafka/securityProtocol",
        ),
        (
            format!("{ok},kafka.sasl.mechanism=MD5"),
            "/kafka/sasl/mechanism",
        ),
        (
            format!("{ok},watchNamespace=Not_A_Namespace"),
            "/watchNamespace",
        ),
        (format!("{ok},metrics.port=70000"), "/metrics/port"),
        (
            format!("{ok},prometheusRule.outboxOldestPendingSeconds=0"),
            "/prometheusRule/outboxOldestPendingSeconds",
        ),
        (
            format!("{ok},prometheusRule.outboxStalledFor=soon"),
            "/prometheusRule/outboxStalledFor",
        ),
        // Combinations the schema cannot express fail in the templates.
        (
            format!("{ok},kafka.securityProtocol=SASL_SSL"),
            "kafka.sasl.secretName: kafka.securityProtocol SASL_SSL needs",
        ),
        (
            format!("{ok},kafka.tls.enabled=true"),
            "kafka.tls.caSecret.name",
        ),
        (
            format!("{ok},leaderElection.enabled=false"),
            "leaderElection.enabled: more than one replica",
        ),
    ];
    for (set, expected) in cases {
        let ran = env.helm(&["template", "x", &chart(), "--set", &set]);
        assert!(!ran.ok, "helm template accepted {set}:\n{}", ran.stdout);
        assert!(
            ran.stderr.contains(expected),
            "the error for {set} should name {expected}, got:\n{}",
            ran.stderr
        );
    }
    // The same value, valid, renders.
    env.helm(&[
        "template",
        "x",
        &chart(),
        "--set",
        "kafka.bootstrapServers=kafka:9092,resyncInterval=1m30s,replicaCount=1,leaderElection.enabled=false",
    ])
    .expect_ok("helm template with valid values");
}

#[tokio::test]
async fn rendered_chart_passes_a_server_side_dry_run() {
    let env = env().await;
    let ns = env.namespace("chart-dry").await;
    let apps = env.namespace("chart-dry-apps").await;
    let release = unique("dry");
    for extra in [
        // Every namespace: ClusterRole and ClusterRoleBinding.
        "replicaCount=2".to_string(),
        // One namespace: Roles there and in the release namespace.
        format!(
            "watchNamespace={apps},kafka.sasl.secretName=kafka-user,kafka.tls.enabled=true,kafka.tls.caSecret.name=kafka-ca,grafanaDashboard.enabled=true"
        ),
    ] {
        let manifests = env
            .helm(&[
                "template",
                &release,
                &chart(),
                "-n",
                &ns,
                "--set",
                "kafka.bootstrapServers=kafka:9092",
                "--set",
                &extra,
            ])
            .expect_ok("helm template");
        let out = env
            .kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&manifests))
            .expect_ok(&format!("kubectl apply --dry-run=server with {extra}"));
        for kind in ["deployment.apps", "serviceaccount", "service"] {
            assert!(out.contains(kind), "{kind} missing from:\n{out}");
        }
        let rbac = if extra.contains("watchNamespace") {
            "role.rbac.authorization.k8s.io"
        } else {
            "clusterrole.rbac.authorization.k8s.io"
        };
        assert!(out.contains(rbac), "{rbac} missing from:\n{out}");
    }
}

/// A release of the chart in its own namespace, watching another (`apps`), with the
/// environment's Kafka super user in a Secret.
struct Release {
    name: String,
    ns: String,
    apps: String,
}

async fn install(env: &TestEnv, prefix: &str) -> Release {
    install_with(env, prefix, "replicaCount=0").await
}

/// [`install`] with extra `--set` values (later values win).
async fn install_with(env: &TestEnv, prefix: &str, extra: &str) -> Release {
    let ns = env.namespace(prefix).await;
    let apps = env.namespace(&format!("{prefix}-apps")).await;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kafka-operator-user"},
        "stringData": {"username": env.info.kafka_admin_user, "password": env.info.kafka_admin_password},
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let name = "eventops".to_string();
    let mut args = install_args("install", &name, &ns, &apps, env);
    args.extend(["--set".to_string(), extra.to_string()]);
    env.helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .expect_ok("helm install");
    Release { name, ns, apps }
}

fn install_args(verb: &str, name: &str, ns: &str, apps: &str, env: &TestEnv) -> Vec<String> {
    [
        verb,
        name,
        &chart(),
        "-n",
        ns,
        "--set",
        &format!(
            "kafka.bootstrapServers={},kafka.sasl.secretName=kafka-operator-user,kafka.sasl.mechanism={}",
            env.info.kafka_bootstrap, env.info.kafka_sasl_mechanism
        ),
        "--set",
        // No pods: the test runs the operator itself, from the Deployment's spec, so
        // that nothing else (a kubelet stand-in) competes for the Lease.
        &format!("watchNamespace={apps},resyncInterval=2s,logLevel=info,replicaCount=0"),
    ]
    .map(String::from)
    .to_vec()
}

/// An EventTopic and a ConsumerGroup of it, as a GitOps tool would apply them.
fn manifests(topic: &str) -> String {
    manifests_at(topic, 2)
}

/// [`manifests`] with the group at `min_replicas` (and at most 2).
fn manifests_at(topic: &str, min_replicas: i32) -> String {
    format!(
        "apiVersion: eventops.dev/v1alpha1
kind: EventTopic
metadata:
  name: orders
spec:
  topicName: {topic}
  partitions: 2
---
apiVersion: eventops.dev/v1alpha1
kind: ConsumerGroup
metadata:
  name: billing
spec:
  topics: [orders]
  template:
    image: billing:1
  scaling:
    minReplicas: {min_replicas}
    maxReplicas: 2
"
    )
}

/// Applies [`manifests_at`] with the group at minReplicas 1, waits (at most 20 s) for its
/// Deployment, then raises minReplicas to 2: the Deployment is created at 1, so only the
/// autoscaler's scale write (`deployments/scale`) gets it to the 2 that `all_done` wants.
async fn apply_then_raise(env: &TestEnv, ns: &str, topic: &str) {
    apply_manifests(env, ns, &manifests_at(topic, 1));
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    while deployments
        .get_opt("billing")
        .await
        .ok()
        .flatten()
        .is_none()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    apply_manifests(env, ns, &manifests_at(topic, 2));
}

fn apply_manifests(env: &TestEnv, ns: &str, yaml: &str) -> String {
    env.kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=gitops",
            "-n",
            ns,
            "-f",
            "-",
        ],
        Some(yaml),
    )
    .expect_ok("kubectl apply --server-side")
}

/// Ready=True for the generation the object has now (what kstatus, Argo CD and Flux
/// read), else why not.
fn ready_for_generation<K: HasConditions + kube::Resource>(obj: &K) -> Result<(), String> {
    let generation = obj.meta().generation;
    let ready = obj
        .conditions()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .ok_or("no Ready condition")?;
    if ready.status != "True" {
        return Err(format!("Ready={}: {}", ready.status, ready.message));
    }
    if obj.conditions().iter().any(|c| c.type_ == "Reconciling") {
        return Err("Ready, yet a Reconciling condition is left (kstatus: in progress)".into());
    }
    if ready.observed_generation != generation {
        return Err(format!(
            "Ready observedGeneration {:?} != generation {generation:?}",
            ready.observed_generation
        ));
    }
    Ok(())
}

/// Whether the operator did all of its job for [`manifests`] in `apps`: both resources
/// Ready for their generation, status.observedGeneration current, and Events published.
async fn all_done(env: &TestEnv, apps: &str) -> Result<(), String> {
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), apps);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), apps);
    let et = topics.get("orders").await.map_err(|e| e.to_string())?;
    ready_for_generation(&et).map_err(|e| format!("EventTopic: {e}"))?;
    let observed = et.status.as_ref().and_then(|s| s.observed_generation);
    if observed != et.metadata.generation {
        return Err(format!("EventTopic status.observedGeneration {observed:?}"));
    }
    let cg = groups.get("billing").await.map_err(|e| e.to_string())?;
    ready_for_generation(&cg).map_err(|e| format!("ConsumerGroup: {e}"))?;
    let observed = cg.status.as_ref().and_then(|s| s.observed_generation);
    if observed != cg.metadata.generation {
        return Err(format!(
            "ConsumerGroup status.observedGeneration {observed:?}"
        ));
    }
    if operator_events(env, apps, "ConsumerGroup", "billing").await == 0 {
        return Err("no Event from the operator about the ConsumerGroup".into());
    }
    // minReplicas 2: set at creation, or by the autoscaler through deployments/scale.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.client.clone(), apps);
    let replicas = deployments
        .get("billing")
        .await
        .map_err(|e| format!("Deployment billing: {e}"))?
        .spec
        .replicas;
    if replicas != Some(2) {
        return Err(format!(
            "Deployment billing has replicas {replicas:?}, not minReplicas 2"
        ));
    }
    Ok(())
}

/// How many Events the operator published about the object `kind`/`name` (the
/// Deployment's controller writes Events about a Deployment of the same name).
async fn operator_events(env: &TestEnv, ns: &str, kind: &str, name: &str) -> usize {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), ns);
    let events = api.list(&Default::default()).await.expect("listing Events");
    events
        .items
        .iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("eventops-operator"))
        .filter_map(|e| e.regarding.as_ref())
        .filter(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        .count()
}

/// Waits until [`all_done`] holds, up to `timeout`; the last reason it did not.
async fn wait_all_done(env: &TestEnv, apps: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let result = all_done(env, apps).await;
        if result.is_ok() || Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn start_operator(env: &TestEnv, release: &Release) -> ChartOperator {
    let log = env
        .info
        .state_dir
        .join(format!("operator-{}.log", release.ns));
    env.run_chart_deployment(&release.ns, &release.name, free_port(), &log)
        .await
}

/// Resource versions of the release's objects, by kind/name.
async fn release_versions(env: &TestEnv, release: &Release) -> Vec<(String, String)> {
    let out = env
        .kubectl(
            &[
                "get",
                "deployment,serviceaccount,service,poddisruptionbudget,role,rolebinding",
                "-n",
                &release.ns,
                "-l",
                "app.kubernetes.io/instance=eventops",
                "-o",
                "jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.resourceVersion}{\"\\n\"}{end}",
            ],
            None,
        )
        .expect_ok("kubectl get");
    let roles = env
        .kubectl(
            &[
                "get",
                "role,rolebinding",
                "-n",
                &release.apps,
                "-o",
                "jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.resourceVersion}{\"\\n\"}{end}",
            ],
            None,
        )
        .expect_ok("kubectl get");
    out.lines()
        .chain(roles.lines())
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn installed_chart_runs_the_operator_under_its_rbac_without_churn() {
    let env = env().await;
    let release = install(&env, "chart-install").await;

    // The chart's objects: a Deployment as the issue asks for it.
    let d = Api::<Deployment>::namespaced(env.client.clone(), &release.ns)
        .get(&release.name)
        .await
        .unwrap();
    let pod = d.spec.template.spec.clone().unwrap();
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        pod.security_context.unwrap().run_as_non_root,
        Some(true),
        "non-root"
    );
    assert!(c.resources.as_ref().unwrap().requests.is_some());
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
    assert_eq!(d.spec.replicas, Some(0), "as installed by the test");
    let defaults = env
        .helm(&[
            "template",
            "x",
            &chart(),
            "--set",
            "kafka.bootstrapServers=k:9092",
        ])
        .expect_ok("helm template");
    assert!(defaults.contains("replicas: 2"), "two replicas by default");
    assert!(defaults.contains("kind: PodDisruptionBudget"));

    let mut operator = start_operator(&env, &release).await;
    let topic = unique("chart.order-placed");
    // Besides the pair that becomes Ready, a group waiting for an EventTopic nobody
    // applied: kstatus must read it as in progress (Reconciling), and it must not churn.
    let waiting = "apiVersion: eventops.dev/v1alpha1
kind: ConsumerGroup
metadata:
  name: waiting
spec:
  topics: [never-applied]
  template:
    image: waiting:1
";
    let all = format!("{}---\n{waiting}", manifests(&topic));
    apply_manifests(&env, &release.apps, &all);
    let done = wait_all_done(&env, &release.apps, Duration::from_secs(90)).await;
    assert!(
        done.is_ok(),
        "{done:?}; operator output:\n{}",
        operator.output()
    );
    assert!(operator.running(), "{}", operator.output());
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &release.apps);
    let (ready, reconciling, waiting) = eventually(
        Duration::from_secs(30),
        "the waiting group's status",
        || async {
            let waiting = groups.get("waiting").await.ok()?;
            let find = |t: &str| waiting.conditions().into_iter().find(|c| c.type_ == t);
            Some((find("Ready")?, find("Reconciling")?, waiting))
        },
    )
    .await;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "TopicNotFound")
    );
    assert_eq!(
        (reconciling.status.as_str(), reconciling.reason.as_str()),
        ("True", "TopicNotFound")
    );
    assert_eq!(reconciling.observed_generation, waiting.metadata.generation);
    assert!(env.topic_exists(&topic).await, "Kafka has the topic");
    // It leads through the chart's Lease permissions.
    let lease = env
        .kubectl(
            &[
                "get",
                "lease",
                "eventops-operator",
                "-n",
                &release.ns,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
            None,
        )
        .expect_ok("kubectl get lease");
    assert_eq!(lease, "eventops-local");
    assert!(
        !operator.output().to_lowercase().contains("forbidden"),
        "the chart's RBAC refused the operator something:\n{}",
        operator.output()
    );

    // GitOps: the same manifests applied again, several resyncs (2 s) later, nothing was
    // written: no resourceVersion moved (spec or status), the operator counted no write.
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &release.apps);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &release.apps);
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &release.apps);
    let versions = || async {
        (
            topics.get("orders").await.unwrap().resource_version(),
            groups.get("billing").await.unwrap().resource_version(),
            groups.get("waiting").await.unwrap().resource_version(),
            // The Deployment's generation: its status moves with the controllers.
            deployments
                .get("billing")
                .await
                .unwrap()
                .metadata
                .generation,
            secrets
                .get("billing-kafka")
                .await
                .unwrap()
                .resource_version(),
        )
    };
    // Let the first round of Events and status settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = versions().await;
    let writes = |op: &ChartOperator| op.metric_sum("eventops_operator_kubernetes_writes_total");
    let reconciles = |op: &ChartOperator| op.metric_sum("eventops_operator_reconciles_total");
    let kafka_writes = |op: &ChartOperator| {
        [
            "CreateTopics",
            "CreatePartitions",
            "AlterConfigs",
            "DeleteTopics",
            "CreateAcls",
            "DeleteAcls",
            "AlterUserScramCredentials",
        ]
        .iter()
        .map(|r| {
            let (_, body) = eventops_tests::http_get(op.metrics_port, "/metrics").unwrap();
            body.lines()
                .filter(|l| {
                    l.starts_with("eventops_operator_kafka_admin_requests_total")
                        && l.contains(&format!("request=\"{r}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum::<f64>()
    };
    let (writes_before, reconciles_before, kafka_before) = (
        writes(&operator),
        reconciles(&operator),
        kafka_writes(&operator),
    );
    for _ in 0..3 {
        let out = apply_manifests(&env, &release.apps, &all);
        assert!(out.contains("serverside-applied"), "{out}");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    eprintln!(
        "3 re-applies over 9 s: {} reconciles, {} Kubernetes writes, {} Kafka writes",
        reconciles(&operator).unwrap() - reconciles_before.unwrap(),
        writes(&operator).unwrap() - writes_before.unwrap(),
        kafka_writes(&operator) - kafka_before,
    );
    assert!(
        reconciles(&operator).unwrap() >= reconciles_before.unwrap() + 4.0,
        "the window held several resyncs of both resources"
    );
    assert_eq!(versions().await, before, "re-applying changed an object");
    assert_eq!(
        writes(&operator),
        writes_before,
        "Kubernetes writes during resyncs"
    );
    assert_eq!(
        kafka_writes(&operator),
        kafka_before,
        "Kafka writes during resyncs"
    );

    // `helm upgrade` with the same values changes none of the release's objects.
    let chart_before = release_versions(&env, &release).await;
    assert!(chart_before.len() >= 7, "{chart_before:?}");
    env.helm(
        &install_args("upgrade", &release.name, &release.ns, &release.apps, &env)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .expect_ok("helm upgrade");
    assert_eq!(
        release_versions(&env, &release).await,
        chart_before,
        "helm upgrade with the same values changed objects"
    );
}

/// Verbs removed one at a time from the rule that grants them, besides whole rules.
const SINGLE_VERBS: [(&str, &str); 4] = [
    ("secrets", "create"),
    ("deployments", "create"),
    ("consumergroups", "patch"),
    ("leases", "patch"),
];

/// Least privilege, the other way round: for every rule of the chart's Roles, a release
/// whose Role lacks just that rule leaves the operator unable to finish, and the API
/// server's refusal shows in its output.
#[tokio::test(flavor = "multi_thread")]
async fn removing_any_rule_of_the_charts_rbac_breaks_the_operator() {
    let env = env().await;
    let probe = install(&env, "chart-rules").await;
    let mut cases = vec![];
    for (role_ns, role_name) in [
        (probe.apps.clone(), probe.name.clone()),
        (probe.ns.clone(), format!("{}-leader-election", probe.name)),
    ] {
        let role = Api::<Role>::namespaced(env.client.clone(), &role_ns)
            .get(&role_name)
            .await
            .unwrap();
        for (i, rule) in role.rules.iter().flatten().enumerate() {
            let resources = rule.resources.clone().unwrap_or_default();
            let leader = role_name.ends_with("leader-election");
            cases.push((leader, i, None, format!("{resources:?} {:?}", rule.verbs)));
            // Single verbs whose need is not obvious: server-side apply creates through
            // `create`, finalizers and Lease renewals are patches.
            for (resource, verb) in SINGLE_VERBS {
                if resources.iter().any(|r| r == resource) && rule.verbs.iter().any(|v| v == verb) {
                    cases.push((leader, i, Some(verb), format!("{verb} of {resources:?}")));
                }
            }
        }
    }
    assert!(cases.len() >= 11, "{cases:?}");

    let runs = cases.into_iter().map(|(leader, index, verb, what)| {
        let env = &env;
        async move {
            let release = install(env, "chart-rule").await;
            let (ns, name) = if leader {
                (
                    release.ns.clone(),
                    format!("{}-leader-election", release.name),
                )
            } else {
                (release.apps.clone(), release.name.clone())
            };
            let roles: Api<Role> = Api::namespaced(env.client.clone(), &ns);
            let mut role = roles.get(&name).await.unwrap();
            let rules = role.rules.as_mut().unwrap();
            match verb {
                Some(verb) => rules[index].verbs.retain(|v| v != verb),
                None => drop(rules.remove(index)),
            }
            roles
                .replace(&name, &PostParams::default(), &role)
                .await
                .unwrap();
            let operator = start_operator(env, &release).await;
            apply_then_raise(env, &release.apps, &unique("chart.rule-removed")).await;
            let result = wait_all_done(env, &release.apps, Duration::from_secs(40)).await;
            (what, result, operator.output())
        }
    });
    let results = futures::future::join_all(runs).await;
    for (what, result, output) in &results {
        assert!(
            result.is_err(),
            "without the rule {what} the operator still did everything:\n{output}"
        );
        assert!(
            output.to_lowercase().contains("forbidden"),
            "without the rule {what} the operator failed ({result:?}) but no refusal shows:\n{output}"
        );
        let refusal = output
            .lines()
            .find(|l| l.to_lowercase().contains("forbidden"))
            .unwrap_or_default();
        eprintln!(
            "without {what}: {}\n  {refusal}",
            result.as_ref().unwrap_err()
        );
    }
    // And the probe release, with every rule, did everything.
    let operator = start_operator(&env, &probe).await;
    apply_then_raise(&env, &probe.apps, &unique("chart.all-rules")).await;
    let done = wait_all_done(&env, &probe.apps, Duration::from_secs(90)).await;
    assert!(done.is_ok(), "{done:?}:\n{}", operator.output());
}

/// The ServiceMonitor and PrometheusRule validate against the Prometheus Operator's own
/// CRDs (fetched from its Go module by `tools/install-prometheus-crds.sh`), and the
/// dashboard is valid JSON; every metric the rules and dashboard use is in the chart
/// README's table, the one place the names are kept, and every alert is named there; the
/// outbox alert's threshold and duration come from the values.
#[tokio::test]
async fn monitoring_assets_pass_a_server_side_dry_run() {
    let env = env().await;
    let script = chart_dir().join("../../tools/install-prometheus-crds.sh");
    let out = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crds = String::from_utf8(out.stdout).unwrap().trim().to_string();
    env.kubectl(&["apply", "--server-side", "-f", &crds], None)
        .expect_ok("applying the Prometheus Operator CRDs");
    env.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ],
        None,
    )
    .expect_ok("waiting for the CRDs");

    let ns = env.namespace("chart-monitoring").await;
    let manifests = env
        .helm(&[
            "template",
            &unique("mon"),
            &chart(),
            "-n",
            &ns,
            "--set",
            "kafka.bootstrapServers=kafka:9092",
            "--set",
            EVERYTHING,
        ])
        .expect_ok("helm template");
    let out = env
        .kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&manifests))
        .expect_ok("kubectl apply --dry-run=server");
    for kind in [
        "servicemonitor.monitoring.coreos.com",
        "prometheusrule.monitoring.coreos.com",
        "configmap",
    ] {
        assert!(out.contains(kind), "{kind} missing from:\n{out}");
    }

    let dashboard = std::fs::read_to_string(chart_dir().join("dashboards/eventops.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    assert!(parsed["panels"].as_array().unwrap().len() >= 4);
    let rules = std::fs::read_to_string(chart_dir().join("templates/prometheusrule.yaml")).unwrap();
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for text in [&dashboard, &rules] {
        for (i, _) in text.match_indices("eventops_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.insert(name);
        }
    }
    assert!(used.len() >= 6, "{used:?}");
    for name in &used {
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} is used by the rules or dashboard but not listed in charts/eventops/README.md"
        );
    }
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(
        alerts,
        [
            "EventOpsConsumerLagGrowing",
            "EventOpsDeadLetterArrivals",
            "EventOpsOutboxStalled",
            "EventOpsReconcileFailures",
            "EventOpsOperatorDown",
        ]
    );
    for alert in &alerts {
        assert!(
            readme.contains(&format!("`{alert}`")),
            "alert {alert} is not described in charts/eventops/README.md"
        );
    }

    // The outbox alert: the values set its threshold and how long it must hold.
    let rendered = env
        .helm(&[
            "template",
            &unique("mon"),
            &chart(),
            "-n",
            &ns,
            "--show-only",
            "templates/prometheusrule.yaml",
            "--set",
            "kafka.bootstrapServers=kafka:9092,prometheusRule.enabled=true",
            "--set",
            "prometheusRule.outboxOldestPendingSeconds=120,prometheusRule.outboxStalledFor=2m",
        ])
        .expect_ok("helm template of the PrometheusRule");
    let outbox = rendered
        .split("- alert: ")
        .find(|rule| rule.starts_with("EventOpsOutboxStalled"))
        .expect("the outbox alert");
    let line = |prefix: &str| {
        outbox
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {outbox}"))
    };
    assert!(
        outbox.contains("eventops_worker_outbox_oldest_pending_age_seconds"),
        "{outbox}"
    );
    assert_eq!(line(") > "), ") > 120");
    assert_eq!(line("for: "), "for: 2m");
    assert!(
        line("description: ").contains("more than 120 s for 2m"),
        "{outbox}"
    );
}

/// All-namespaces mode: the same rules through a ClusterRole, asked of the API server's
/// authorizer (`kubectl auth can-i --as` the ServiceAccount) in a namespace the release
/// knows nothing about, and nothing beyond them.
#[tokio::test]
async fn cluster_wide_install_grants_the_rules_everywhere_and_nothing_else() {
    let env = env().await;
    let ns = env.namespace("chart-cluster").await;
    let elsewhere = env.namespace("chart-elsewhere").await;
    let release = unique("cw");
    env.helm(&[
        "install",
        &release,
        &chart(),
        "-n",
        &ns,
        "--set",
        "kafka.bootstrapServers=kafka:9092,replicaCount=0",
    ])
    .expect_ok("helm install");
    let sa = format!("system:serviceaccount:{ns}:{release}-eventops");
    // `resource/sub` asks for a subresource (kubectl reads `resource/name` otherwise).
    let can = |verb: &str, resource: &str, namespace: &str| {
        let mut args = vec!["auth", "can-i", verb, "-n", namespace, "--as", &sa];
        let sub;
        match resource.split_once('/') {
            Some((r, s)) if s == "status" || s == "scale" => {
                sub = format!("--subresource={s}");
                args.extend([r, sub.as_str()]);
            }
            _ => args.push(resource),
        }
        let out = env.kubectl(&args, None);
        match out.stdout.trim() {
            "yes" => true,
            "no" => false,
            _ => panic!("kubectl {args:?}: {out:?}"),
        }
    };
    let granted = [
        ("watch", "eventtopics.eventops.dev"),
        ("patch", "consumergroups.eventops.dev"),
        ("patch", "consumergroups.eventops.dev/status"),
        ("patch", "eventtopics.eventops.dev/status"),
        ("create", "deployments.apps"),
        ("update", "deployments.apps/scale"),
        ("create", "secrets"),
        ("create", "events.events.k8s.io"),
    ];
    let refused = [
        ("list", "secrets"),
        ("watch", "secrets"),
        ("delete", "secrets"),
        ("delete", "deployments.apps"),
        ("update", "deployments.apps"),
        ("delete", "eventtopics.eventops.dev"),
        ("update", "consumergroups.eventops.dev/status"),
        ("patch", "deployments.apps/status"),
        ("get", "pods"),
        ("create", "events"),
        ("create", "leases.coordination.k8s.io"),
    ];
    let mut wrong = vec![];
    for (verb, resource) in granted {
        if !can(verb, resource, &elsewhere) {
            wrong.push(format!("{verb} {resource} refused"));
        }
    }
    for (verb, resource) in refused {
        if can(verb, resource, &elsewhere) {
            wrong.push(format!("{verb} {resource} granted"));
        }
    }
    // The Lease only in the release namespace.
    if !can("create", "leases.coordination.k8s.io", &ns) {
        wrong.push("create leases refused in the release namespace".into());
    }
    if !can("patch", "leases.coordination.k8s.io/eventops-operator", &ns)
        || can("patch", "leases.coordination.k8s.io/other", &ns)
    {
        wrong.push("patch leases not limited to eventops-operator".into());
    }
    if can("create", "namespaces", &ns) {
        wrong.push("create namespaces granted".into());
    }
    env.helm(&["uninstall", &release, "-n", &ns])
        .expect_ok("helm uninstall");
    assert!(wrong.is_empty(), "{wrong:?}");
}

/// The chart's own Deployment, run as pods by the node agent (a kubelet stand-in): two
/// operator replicas under the chart's ServiceAccount token and RBAC, one leading through
/// the Lease, both Ready, and the leader makes an EventTopic and a ConsumerGroup Ready.
#[tokio::test]
async fn the_charts_deployment_runs_as_pods_and_reconciles() {
    let env = env().await;
    let release = install_with(&env, "chart-pods", "replicaCount=2").await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &release.ns);
    eventually(
        Duration::from_secs(90),
        "both operator pods Ready",
        || async {
            let d = deployments.get(&release.name).await.ok()?;
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            (ready == 2).then_some(())
        },
    )
    .await;

    let topic = unique("chart.pods.placed");
    apply_manifests(&env, &release.apps, &manifests(&topic));
    wait_all_done(&env, &release.apps, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("the chart's operator pods did not finish: {e}"));
    assert!(env.topic_exists(&topic).await, "Kafka has no topic {topic}");

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), &release.ns);
    let holder = leases
        .get("eventops-operator")
        .await
        .expect("the operator's Lease in the release namespace")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a Lease holder");
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client.clone(), &release.ns);
    let names: Vec<String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert!(
        names.iter().any(|n| holder.contains(n.as_str())),
        "Lease holder {holder} is none of the operator pods {names:?}"
    );
    env.helm(&["uninstall", &release.name, "-n", &release.ns, "--wait"])
        .expect_ok("helm uninstall");
}

#[tokio::test]
async fn namespace_policy_values_render_to_operator_flags_and_default_to_permissive() {
    let env = env().await;
    let ok = "kafka.bootstrapServers=kafka:9092";
    let flags = |rendered: &str| -> Vec<String> {
        rendered
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- --namespace-prefixes="))
            .map(String::from)
            .collect()
    };
    let default = env
        .helm(&["template", "x", &chart(), "--set", ok])
        .expect_ok("helm template with defaults");
    assert_eq!(
        flags(&default),
        Vec::<String>::new(),
        "the default is permissive"
    );

    let rendered = env
        .helm(&[
            "template",
            "x",
            &chart(),
            "--set",
            ok,
            "--set-json",
            r#"namespacePolicy={"team-checkout":["orders.","checkout."],"*":["sandbox."],"team-idle":[]}"#,
        ])
        .expect_ok("helm template with a namespace policy");
    let flags = flags(&rendered);
    assert_eq!(
        flags,
        [
            "*=sandbox.",
            "team-checkout=orders.,checkout.",
            "team-idle="
        ],
        "{rendered}"
    );
    // The operator reads them as meant.
    let policy = eventops_operator::policy::NamespacePolicy::new(
        flags
            .iter()
            .map(|f| eventops_operator::policy::parse_entry(f).unwrap()),
    )
    .unwrap();
    assert_eq!(
        policy.check("team-checkout", "spec.topicName", "checkout.cart.emptied"),
        Ok(())
    );
    assert!(
        policy
            .check("team-idle", "spec.groupId", "orders.x")
            .is_err()
    );
    assert_eq!(policy.check("dev", "spec.groupId", "sandbox.g"), Ok(()));

    let ran = env.helm(&[
        "template",
        "x",
        &chart(),
        "--set",
        ok,
        "--set-json",
        r#"namespacePolicy={"Team_A":["orders."]}"#,
    ]);
    assert!(!ran.ok, "an invalid namespace name is refused");
    // Helm 4 places a propertyNames failure at a neighbouring path (it printed
    // "at '/probes': invalid propertyName 'Team_A'"), so the refused name is what to
    // look for.
    assert!(
        ran.stderr.contains("invalid propertyName 'Team_A'"),
        "{}",
        ran.stderr
    );
    // A prefix without a separator at its end would also grant "orders-archive".
    let ran = env.helm(&[
        "template",
        "x",
        &chart(),
        "--set",
        ok,
        "--set-json",
        r#"namespacePolicy={"team-a":["orders"]}"#,
    ]);
    assert!(!ran.ok, "a prefix without a separator is refused");
    assert!(ran.stderr.contains("orders"), "{}", ran.stderr);
}
