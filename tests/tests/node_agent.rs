//! The environment's node agent (development and test stand-in for a kubelet) against
//! the real API server and controller-manager: Deployments get pods that are bound to
//! its node and really run as local processes, each on its own address, with the
//! kubelet's environment, probes, restarts, graceful deletion and service-account
//! credentials.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use eventops_tests::pods::{
    condition, http_get_at, is_ready, pod_ip, probe_container, probe_env, probe_out_dir, wait_pods,
};
use eventops_tests::{env, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

const NODE: &str = "eventops-local";

fn object<K: serde::de::DeserializeOwned>(value: serde_json::Value) -> K {
    serde_json::from_value(value).expect("a valid object")
}

#[tokio::test]
async fn deployment_pods_run_ready_on_their_own_addresses_and_stop_on_scale_in() {
    let env = env().await;
    let ns = env.namespace("node-agent").await;
    let client = env.client.clone();
    let node = Api::<Node>::all(client.clone()).get(NODE).await.unwrap();
    assert_eq!(
        node.metadata.labels.unwrap()["eventops.dev/dev-node"],
        "true"
    );
    let ready = node.status.unwrap().conditions.unwrap();
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &object(
                json!({"metadata": {"name": "probe-secret"}, "stringData": {"token": "s3cret"}}),
            ),
        )
        .await
        .unwrap();
    let out = probe_out_dir("node-agent-probe");
    let container = probe_container(
        &out,
        json!([{"name": "SECRET_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "probe-secret", "key": "token"}}}]),
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let created = Instant::now();
    deployments
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "probe"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "probe"}},
                    "template": {
                        "metadata": {"labels": {"app": "probe"}},
                        "spec": {"containers": [container]},
                    },
                },
            })),
        )
        .await
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = wait_pods(
        &pods,
        "app=probe",
        Duration::from_secs(60),
        "2 pods Running",
        |p| {
            p.len() == 2
                && p.iter()
                    .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        },
    )
    .await;
    let to_running = created.elapsed();
    assert!(
        running
            .iter()
            .all(|p| { p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE) })
    );
    let ready = wait_pods(
        &pods,
        "app=probe",
        Duration::from_secs(60),
        "2 pods Ready",
        |p| p.len() == 2 && p.iter().all(is_ready),
    )
    .await;
    let to_ready = created.elapsed();
    println!(
        "figures: Deployment created -> 2 pods Running in {:.2}s, Ready in {:.2}s",
        to_running.as_secs_f64(),
        to_ready.as_secs_f64()
    );

    // Distinct loopback addresses, each serving the probe port of its own process.
    let ips: BTreeSet<String> = ready.iter().map(pod_ip).collect();
    assert_eq!(ips.len(), 2, "{ips:?}");
    for pod in &ready {
        let ip = pod_ip(pod);
        assert!(ip.starts_with("127.") && ip != "127.0.0.1", "{ip}");
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
        let cs = &status.container_statuses.as_ref().unwrap()[0];
        assert!(cs.ready && cs.state.as_ref().unwrap().running.is_some());
        for c in ["PodScheduled", "Initialized", "ContainersReady"] {
            assert_eq!(condition(pod, c), Some("True"), "{c}");
        }
        assert_eq!(http_get_at(&ip, 8080, "/readyz").map(|r| r.0), Some(200));

        // The environment as the kubelet builds it.
        let name = pod.metadata.name.clone().unwrap();
        let seen = probe_env(&out, &name).expect("pod-probe wrote its environment");
        assert_eq!(seen["SECRET_TOKEN"], "s3cret");
        assert_eq!(seen["POD_IP"], ip);
        assert_eq!(seen["PROBE_ADDR"], format!("{ip}:8080"));
        assert_eq!(seen["POD_NAMESPACE"], ns);
        assert_eq!(seen["HOSTNAME"], name);
        assert!(seen["KUBECONFIG"].ends_with("/kubeconfig"));
    }

    // Scale in: the processes get SIGTERM, and the pods are deleted for good.
    let names: Vec<String> = ready
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    let scaled = Instant::now();
    deployments
        .patch(
            "probe",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    wait_pods(
        &pods,
        "app=probe",
        Duration::from_secs(60),
        "pods gone",
        |p| p.is_empty(),
    )
    .await;
    println!(
        "figures: scaled to 0 -> pods gone in {:.2}s",
        scaled.elapsed().as_secs_f64()
    );
    for name in names {
        let marker = out.join(format!("{name}.terminated"));
        assert_eq!(
            std::fs::read_to_string(&marker).ok().as_deref(),
            Some("SIGTERM"),
            "{name} did not get SIGTERM"
        );
        // The address is free again: nothing listens there any more.
    }
    for ip in ips {
        assert_eq!(
            http_get_at(&ip, 8080, "/readyz"),
            None,
            "{ip} still answers"
        );
    }
}

#[tokio::test]
async fn a_crashing_container_is_restarted_with_back_off() {
    let env = env().await;
    let ns = env.namespace("node-agent-crash").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &object(json!({
            "metadata": {"name": "crasher", "labels": {"app": "crasher"}},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [{
                    "name": "crash",
                    "image": "unused",
                    "command": ["sh", "-c", "echo crashing; exit 3"],
                }],
            },
        })),
    )
    .await
    .unwrap();
    let saw_back_off = std::sync::atomic::AtomicBool::new(false);
    let pod = eventually(Duration::from_secs(90), "restartCount >= 3", || async {
        let pod = pods.get("crasher").await.ok()?;
        let cs = pod.status.as_ref()?.container_statuses.as_ref()?[0].clone();
        let waiting = cs.state.as_ref()?.waiting.as_ref();
        if waiting.and_then(|w| w.reason.as_deref()) == Some("CrashLoopBackOff") {
            saw_back_off.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        (cs.restart_count >= 3).then_some(pod)
    })
    .await;
    assert!(
        saw_back_off.into_inner(),
        "the container never waited in CrashLoopBackOff"
    );
    let status = pod.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let cs = &status.container_statuses.unwrap()[0];
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("the last run's end is reported");
    assert_eq!(last.exit_code, 3);

    // Its output went to the pod's log file.
    let log = env
        .info
        .state_dir
        .join("pods")
        .join(format!("{ns}_crasher"))
        .join("crash.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.matches("crashing").count() >= 3, "{text}");

    pods.delete("crasher", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "crasher deleted", || async {
        pods.get_opt("crasher").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_unknown_image_waits_naming_the_binary_it_looked_for() {
    let env = env().await;
    let ns = env.namespace("node-agent-image").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &object(json!({
            "metadata": {"name": "missing"},
            "spec": {"containers": [{"name": "c", "image": "ghcr.io/eventops/no-such-worker:1.0"}]},
        })),
    )
    .await
    .unwrap();
    let (reason, message) = eventually(Duration::from_secs(30), "ErrImagePull", || async {
        let pod = pods.get("missing").await.ok()?;
        let status = pod.status?;
        let waiting = status.container_statuses?[0].state.clone()?.waiting?;
        Some((waiting.reason?, waiting.message.unwrap_or_default()))
            .filter(|(r, _)| r == "ErrImagePull")
    })
    .await;
    assert_eq!(reason, "ErrImagePull");
    assert!(message.contains("\"no-such-worker\""), "{message}");
    let pod = pods.get("missing").await.unwrap();
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    pods.delete("missing", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "pod deleted", || async {
        pods.get_opt("missing").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_service_account_kubeconfig_has_exactly_its_rbac() {
    let env = env().await;
    let ns = env.namespace("node-agent-rbac").await;
    let client = env.client.clone();
    let pp = PostParams::default();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&pp, &object(json!({"metadata": {"name": "reader"}})))
        .await
        .unwrap();
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &object(json!({
                "metadata": {"name": "read-config-maps"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
            })),
        )
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &object(json!({
                "metadata": {"name": "reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-config-maps"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
            })),
        )
        .await
        .unwrap();
    let out = probe_out_dir("node-agent-rbac");
    let mut container = probe_container(&out, json!([{"name": "PROBE_KUBE_CHECK", "value": "1"}]));
    container["readinessProbe"] = serde_json::Value::Null;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(
        &pp,
        &object(json!({
            "metadata": {"name": "checker"},
            "spec": {"serviceAccountName": "reader", "containers": [container]},
        })),
    )
    .await
    .unwrap();

    // What the process itself got from the API server, through `Config::infer`.
    let report = eventually(Duration::from_secs(60), "the pod's RBAC report", || async {
        let text = std::fs::read_to_string(out.join("checker.kube")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()
    })
    .await;
    assert_eq!(report["configmaps"], "allowed", "{report}");
    assert_eq!(report["secrets"], "forbidden", "{report}");

    // The same kubeconfig, used here: the pod's service account and nothing more.
    let seen = probe_env(&out, "checker").unwrap();
    let kubeconfig = Kubeconfig::read_from(&seen["KUBECONFIG"]).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let pod_client = Client::try_from(config).unwrap();
    assert!(
        Api::<ConfigMap>::namespaced(pod_client.clone(), &ns)
            .list(&Default::default())
            .await
            .is_ok()
    );
    let err = Api::<Secret>::namespaced(pod_client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 403),
        "{err}"
    );
    let err = Api::<ConfigMap>::namespaced(pod_client.clone(), "default")
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 403 && e.message.contains(&format!("system:serviceaccount:{ns}:reader"))),
        "{err}"
    );

    // The token is bound to the pod: it stops working once the pod is gone.
    pods.delete("checker", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "checker deleted", || async {
        pods.get_opt("checker").await.ok()?.is_none().then_some(())
    })
    .await;
    let config_maps = Api::<ConfigMap>::namespaced(pod_client, &ns);
    eventually(Duration::from_secs(30), "the token rejected", || async {
        match config_maps.list(&Default::default()).await {
            Err(kube::Error::Api(e)) if e.code == 401 => Some(()),
            _ => None,
        }
    })
    .await;
}

#[tokio::test]
async fn a_failing_liveness_probe_restarts_the_process() {
    let env = env().await;
    let ns = env.namespace("node-agent-liveness").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    // Nothing listens on the probed port: every liveness probe fails.
    let port = eventops_tests::free_port();
    pods.create(
        &PostParams::default(),
        &object(json!({
            "metadata": {"name": "unhealthy"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "sleeper",
                    "image": "unused",
                    "command": ["sh", "-c", "echo started; exec sleep 1000"],
                    "livenessProbe": {
                        "tcpSocket": {"port": port},
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                }],
            },
        })),
    )
    .await
    .unwrap();
    let pod = eventually(Duration::from_secs(60), "restartCount >= 2", || async {
        let pod = pods.get("unhealthy").await.ok()?;
        let cs = pod.status.as_ref()?.container_statuses.as_ref()?[0].clone();
        (cs.restart_count >= 2).then_some(pod)
    })
    .await;
    let cs = &pod.status.unwrap().container_statuses.unwrap()[0];
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("the killed run is reported");
    // Killed by SIGTERM (15): 128 + 15.
    assert_eq!(last.exit_code, 143, "{last:?}");
    pods.delete("unhealthy", &DeleteParams::default())
        .await
        .unwrap();
}
