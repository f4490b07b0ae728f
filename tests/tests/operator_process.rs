//! The operator binary as it runs in a cluster: two replicas elect one leader through a
//! Lease, the other takes over when the leader goes, and `/metrics`, `/healthz` and
//! `/readyz` answer.

use std::process::{Child, Command};
use std::time::Duration;

use eventops_crds::EventTopic;
use eventops_tests::{TestEnv, apply, env, eventually, free_port, http_get, unique, wait_ready};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;

struct Replica {
    name: &'static str,
    port: u16,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(env: &TestEnv, ns: &str, name: &'static str) -> Replica {
    let port = free_port();
    let child = env
        .operator_command(ns, port)
        .args(["--lease-namespace", ns, "--resync-interval", "5s"])
        .env("POD_NAME", name)
        .spawn()
        .expect("starting eventops-operator");
    Replica { name, port, child }
}

fn ready(r: &Replica) -> Option<bool> {
    http_get(r.port, "/readyz").map(|(code, _)| code == 200)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_elect_one_leader_and_fail_over() {
    let env = env().await;
    let ns = env.namespace("leader").await;
    let mut replicas = [start(&env, &ns, "replica-a"), start(&env, &ns, "replica-b")];

    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    let holder = eventually(Duration::from_secs(60), "a Lease holder", || async {
        leases
            .get_opt("eventops-operator")
            .await
            .ok()??
            .spec?
            .holder_identity
    })
    .await;
    let leader = replicas
        .iter()
        .position(|r| r.name == holder)
        .expect("a replica holds the Lease");
    let follower = 1 - leader;
    eventually(
        Duration::from_secs(30),
        "the leader alone to be ready",
        || async { (ready(&replicas[leader])? && !ready(&replicas[follower])?).then_some(()) },
    )
    .await;
    let follower_health = http_get(replicas[follower].port, "/healthz").map(|(c, _)| c);
    assert_eq!(follower_health, Some(200), "a follower is alive");

    let api: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let led = unique("orders.order-led");
    apply(&api, &led, json!({"partitions": 1})).await.unwrap();
    wait_ready(&api, &led, "True").await;
    let (_, metrics) = http_get(replicas[leader].port, "/metrics").unwrap();
    assert!(
        metrics.contains(r#"eventops_operator_reconciles_total{controller="eventtopic"}"#),
        "{metrics}"
    );

    // SIGTERM: the leader stops; the follower takes the Lease once it expires.
    sigterm(&replicas[leader].child);
    let _ = replicas[leader].child.wait();
    eventually(
        Duration::from_secs(60),
        "the follower to take over",
        || async { ready(&replicas[follower])?.then_some(()) },
    )
    .await;
    let failed_over = unique("orders.order-failed-over");
    apply(&api, &failed_over, json!({"partitions": 1}))
        .await
        .unwrap();
    wait_ready(&api, &failed_over, "True").await;
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}
