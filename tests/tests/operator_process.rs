//! The operator binary as it runs in a cluster: two replicas elect one leader through a
//! Lease, the other takes over when the leader goes, and `/metrics`, `/healthz` and
//! `/readyz` answer.

use std::process::{Child, Command};
use std::time::Duration;

use eventops_crds::EventTopic;
use eventops_operator::leader;
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
    // Counted when the reconcile returns, which may be just after its status write made
    // the EventTopic Ready.
    eventually(
        Duration::from_secs(10),
        "the leader counting its eventtopic reconcile",
        || async {
            let (_, metrics) = http_get(replicas[leader].port, "/metrics")?;
            metrics
                .contains(r#"eventops_operator_reconciles_total{controller="eventtopic"}"#)
                .then_some(())
        },
    )
    .await;

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

/// Replicas that start together race for a Lease nobody holds yet. Exactly one may lead:
/// two leaders at once reconcile the same objects against each other, and the one that
/// finds out later exits. Watched for several rounds, each with a new Lease, through
/// every replica's `/readyz` (ready only while it leads) and its process.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_started_together_never_lead_at_once() {
    let env = env().await;
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    for round in 0..2 {
        let ns = env.namespace("leader-race").await;
        let mut replicas: Vec<Replica> = ["race-a", "race-b", "race-c"]
            .into_iter()
            .map(|name| {
                let port = free_port();
                let child = env
                    .operator_command(&ns, port)
                    .args(["--lease-namespace", &ns, "--resync-interval", "5s"])
                    .env("EVENTOPS_KAFKA_USERNAME", &user.user)
                    .env("EVENTOPS_KAFKA_PASSWORD", &user.password)
                    .env("POD_NAME", name)
                    .spawn()
                    .expect("starting eventops-operator");
                Replica { name, port, child }
            })
            .collect();
        // The watchdog that notices a second holder polls every 2 s; 8 s of watching
        // after the first leader appears covers it several times over.
        let mut polls = 0u32;
        let mut first_leader: Option<tokio::time::Instant> = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let now = tokio::time::Instant::now();
            assert!(now < deadline, "round {round}: no replica led within 60 s");
            if first_leader.is_some_and(|t| now - t > Duration::from_secs(8)) {
                break;
            }
            let leading: Vec<&str> = replicas
                .iter()
                .filter(|r| ready(r) == Some(true))
                .map(|r| r.name)
                .collect();
            assert!(
                leading.len() <= 1,
                "round {round}: {leading:?} lead at the same time"
            );
            if !leading.is_empty() {
                first_leader.get_or_insert(now);
            }
            for r in replicas.iter_mut() {
                let exited = r.child.try_wait().expect("checking a replica");
                assert!(
                    exited.is_none(),
                    "round {round}: {} exited ({exited:?}) while nobody stopped it",
                    r.name
                );
            }
            polls += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The window was watched, not slept through: one leader was seen in it.
        assert!(polls > 50, "round {round}: only {polls} polls");
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
        let holder = leases
            .get("eventops-operator")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity);
        let leader: Vec<&str> = replicas
            .iter()
            .filter(|r| ready(r) == Some(true))
            .map(|r| r.name)
            .collect();
        assert_eq!(
            leader.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            holder.into_iter().collect::<Vec<_>>(),
            "round {round}: the ready replica is the one the Lease names"
        );
    }
}

/// Two replicas see a free Lease at the same moment, and one of them is slower to write
/// (its PATCH requests are held back by a second, as on a loaded node). The fast one takes
/// the Lease; the slow one's write must then be refused, not win over it: a replica that
/// has been told it leads keeps leading until its Lease expires.
#[tokio::test(flavor = "multi_thread")]
async fn a_slower_replica_cannot_take_a_lease_another_has_won() {
    let env = env().await;
    let ns = env.namespace("lease-race").await;
    let slow = delayed_patches_client(&env, Duration::from_secs(1)).await;
    let fast = leader::lease_manager(env.client.clone(), &ns, "fast")
        .await
        .expect("building a lease manager");
    let slow = leader::lease_manager(slow, &ns, "slow")
        .await
        .expect("building a lease manager");
    // Both read the free Lease, then race. A loser waits for the Lease to expire (15 s),
    // so whoever has not won within 8 s lost.
    async fn attempt(manager: &kube_lease_manager::LeaseManager) -> bool {
        match tokio::time::timeout(Duration::from_secs(8), manager.changed()).await {
            Ok(Ok(leads)) => leads,
            Ok(Err(e)) => panic!("lease manager: {e}"),
            Err(_) => false,
        }
    }
    let (fast_leads, slow_leads) = tokio::join!(attempt(&fast), attempt(&slow));
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    let holder = leases
        .get(leader::LEASE_NAME)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("fast"), "the Lease's holder");
    assert!(fast_leads, "the replica that took the Lease leads");
    assert!(!slow_leads, "the slower replica leads too: two leaders");
}

/// A client of the test's API server whose PATCH requests wait `delay` before they go.
async fn delayed_patches_client(env: &TestEnv, delay: Duration) -> kube::Client {
    use std::sync::Arc;
    use tower::ServiceExt as _;

    struct DelayPatches<S> {
        inner: Arc<tokio::sync::Mutex<S>>,
        delay: Duration,
    }
    impl<S> tower::Service<http::Request<kube::client::Body>> for DelayPatches<S>
    where
        S: tower::Service<http::Request<kube::client::Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Response: Send + 'static,
        S::Error: Send + 'static,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
            let inner = self.inner.clone();
            let delay = (req.method() == http::Method::PATCH).then_some(self.delay);
            Box::pin(async move {
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                let response = {
                    let mut service = inner.lock().await;
                    service.ready().await?.call(req)
                };
                response.await
            })
        }
    }

    let kubeconfig = kube::config::Kubeconfig::read_from(&env.info.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let layer = tower::layer::layer_fn(move |inner| DelayPatches {
        inner: Arc::new(tokio::sync::Mutex::new(inner)),
        delay,
    });
    kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&layer)
        .build()
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}
