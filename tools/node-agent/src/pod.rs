//! One pod's life on the node: start its containers as processes, probe and restart
//! them, report status, and on deletion stop them (SIGTERM, grace period, SIGKILL) and
//! delete the pod for good, as the kubelet does.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodStatus, Probe, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::env::{self, PodFields, Sources};
use crate::process::{self, Exit, Launch};
use crate::status::{self, ContainerView, PodFacts, State, Terminated};
use crate::{image, ip, token};

/// What every pod worker shares.
pub struct Agent {
    /// Client with the agent's own credentials.
    pub client: Client,
    /// This node.
    pub node_name: String,
    /// The node's address.
    pub host_ip: String,
    /// Where workspace binaries are.
    pub bin_dir: PathBuf,
    /// Parent of every pod's directory.
    pub pods_dir: PathBuf,
    /// The `PATH` processes get, and commands are looked up on.
    pub path: String,
    /// The API server as pods should reach it, for their kubeconfigs.
    pub cluster: kube::config::Cluster,
    /// Loopback addresses for pods.
    pub ips: Mutex<ip::Allocator>,
    /// First delay before restarting a container that exited again.
    pub backoff_initial: Duration,
    /// Longest delay before a restart.
    pub backoff_max: Duration,
}

/// A container that ran this long gets its restart back-off reset (as in the kubelet).
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);
/// How soon a container that could not be created is tried again.
const CREATE_RETRY: Duration = Duration::from_secs(5);
/// How long processes get when the agent itself stops.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

struct ProbeState {
    probe: Probe,
    next_at: Instant,
    successes: i32,
    failures: i32,
}

impl ProbeState {
    fn new(probe: &Probe, now: Instant) -> Self {
        Self {
            probe: probe.clone(),
            next_at: now + secs(probe.initial_delay_seconds.unwrap_or(0)),
            successes: 0,
            failures: 0,
        }
    }

    fn period(&self) -> Duration {
        secs(self.probe.period_seconds.unwrap_or(10).max(1))
    }

    /// Records a result; `Some(passing)` once a threshold is crossed.
    fn record(&mut self, ok: bool, now: Instant) -> Option<bool> {
        self.next_at = now + self.period();
        if ok {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= self.probe.success_threshold.unwrap_or(1)).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= self.probe.failure_threshold.unwrap_or(3)).then_some(false)
        }
    }
}

struct Run {
    spec: Container,
    view: ContainerView,
    /// The current start, to match exits with.
    run: u64,
    /// When a waiting container may start (again).
    start_at: Option<Instant>,
    started_instant: Option<Instant>,
    backoff: Duration,
    startup: Option<ProbeState>,
    readiness: Option<ProbeState>,
    liveness: Option<ProbeState>,
    /// SIGKILL at this time if still running (after a SIGTERM).
    kill_at: Option<Instant>,
}

impl Run {
    fn running_pid(&self) -> Option<u32> {
        matches!(self.view.state, State::Running { .. })
            .then_some(self.view.pid)
            .flatten()
    }
}

fn secs(n: i32) -> Duration {
    Duration::from_secs(n.max(0) as u64)
}

/// Runs the pod whose latest version `updates` carries (`None` once it is gone from the
/// API server) until it is deleted, or until `stop` turns true (the agent stops).
pub async fn run(
    agent: Arc<Agent>,
    mut updates: watch::Receiver<Option<Pod>>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(pod) = updates.borrow().clone() else {
        return;
    };
    let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    if let Err(e) = Worker::new(agent, pod).run(&mut updates, &mut stop).await {
        warn!(pod = %name, "pod worker failed: {e:#}");
    }
}

struct Worker {
    agent: Arc<Agent>,
    pod: Pod,
    api: Api<Pod>,
    dir: PathBuf,
    ip: Option<ip::PodIp>,
    kubeconfig: Option<token::PodCredentials>,
    containers: Vec<Run>,
    start_time: Timestamp,
    reported: Option<PodStatus>,
    report_retry_at: Option<Instant>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    /// Deadline of the grace period, once the pod is being deleted.
    terminating: Option<Instant>,
    /// The pod is gone from the API server: nothing left to report or delete.
    gone: bool,
}

impl Worker {
    fn new(agent: Arc<Agent>, pod: Pod) -> Self {
        let ns = pod.namespace().unwrap_or_default();
        let api = Api::namespaced(agent.client.clone(), &ns);
        let dir = agent.pods_dir.join(format!("{ns}_{}", pod.name_any()));
        let previous = pod.status.clone().unwrap_or_default();
        let restarts = |name: &str| {
            previous
                .container_statuses
                .iter()
                .flatten()
                .find(|s| s.name == name)
                .map(|s| s.restart_count)
                .unwrap_or(0)
        };
        let containers = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| Run {
                spec: c.clone(),
                view: ContainerView {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    state: State::Waiting {
                        reason: "ContainerCreating".into(),
                        message: None,
                    },
                    last_terminated: None,
                    ready: false,
                    started: false,
                    restart_count: restarts(&c.name),
                    pid: None,
                },
                run: 0,
                start_at: Some(Instant::now()),
                started_instant: None,
                backoff: Duration::ZERO,
                startup: None,
                readiness: None,
                liveness: None,
                kill_at: None,
            })
            .collect();
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Self {
            start_time: previous
                .start_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now),
            agent,
            pod,
            api,
            dir,
            ip: None,
            kubeconfig: None,
            containers,
            reported: None,
            report_retry_at: None,
            exits_tx,
            exits,
            terminating: None,
            gone: false,
        }
    }

    fn name(&self) -> String {
        format!(
            "{}/{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any()
        )
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    async fn run(
        mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.clone());
        let finished = matches!(phase.as_deref(), Some("Succeeded" | "Failed"));
        if finished {
            // It ran to completion before (this agent restarted): never run it again.
            for c in &mut self.containers {
                c.start_at = None;
            }
            self.reported = self.pod.status.clone();
        }
        if self.pod.metadata.deletion_timestamp.is_some() {
            self.begin_termination();
        } else if !finished {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("creating {}", self.dir.display()))?;
            let ip = self.agent.ips.lock().expect("ip lock").allocate()?;
            info!(pod = %self.name(), ip = %ip.ip, "accepted pod");
            self.ip = Some(ip);
        }
        loop {
            self.start_due_containers().await;
            if self.terminating.is_some()
                && self.containers.iter().all(|c| c.running_pid().is_none())
            {
                return self.finish().await;
            }
            self.report().await;
            let deadline = self.next_deadline();
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        // The agent is stopping.
                        return self.stop_for_agent_shutdown().await;
                    }
                    let latest = updates.borrow_and_update().clone();
                    match latest {
                        Some(pod) => {
                            let deleting = pod.metadata.deletion_timestamp.is_some();
                            self.pod = pod;
                            if deleting && self.terminating.is_none() {
                                self.begin_termination();
                            }
                        }
                        None => {
                            self.gone = true;
                            if self.terminating.is_none() {
                                self.begin_termination();
                            }
                        }
                    }
                }
                Some(exit) = self.exits.recv() => self.exited(exit),
                _ = stop.changed() => return self.stop_for_agent_shutdown().await,
                _ = sleep_until(deadline) => self.timers().await,
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut times = Vec::new();
        for c in &self.containers {
            if c.running_pid().is_some() {
                times.extend(c.kill_at);
                if self.terminating.is_none() {
                    for p in [&c.startup, &c.readiness, &c.liveness]
                        .into_iter()
                        .flatten()
                    {
                        times.push(p.next_at);
                    }
                }
            } else if self.terminating.is_none() {
                times.extend(c.start_at);
            }
        }
        times.extend(self.terminating);
        times.extend(self.report_retry_at);
        if let Some(k) = &self.kubeconfig {
            times.push(k.refresh_at);
        }
        times.into_iter().min()
    }

    /// Starts the containers whose time has come.
    async fn start_due_containers(&mut self) {
        if self.terminating.is_some() || self.ip.is_none() {
            return;
        }
        let now = Instant::now();
        for i in 0..self.containers.len() {
            let due = self.containers[i].running_pid().is_none()
                && self.containers[i].start_at.is_some_and(|t| t <= now);
            if due && let Err((reason, message)) = self.start(i).await {
                let c = &mut self.containers[i];
                c.view.state = State::Waiting {
                    reason: reason.into(),
                    message: Some(message),
                };
                c.start_at = Some(Instant::now() + CREATE_RETRY);
            }
        }
    }

    async fn start(&mut self, i: usize) -> Result<(), (&'static str, String)> {
        let spec = self.containers[i].spec.clone();
        let (program, pre_args) = image::resolve(&spec, &self.agent.bin_dir, &self.agent.path)
            .map_err(|e| (e.reason, e.message))?;
        let config_error = |e: anyhow::Error| ("CreateContainerConfigError", format!("{e:#}"));
        self.ensure_credentials().await.map_err(config_error)?;
        let sources = self.sources(&spec).await.map_err(config_error)?;
        let fields = self.fields();
        let container_env =
            env::build(&spec, &fields, &sources).map_err(|e| ("CreateContainerConfigError", e))?;
        let mut full_env = vec![
            ("PATH".to_string(), self.agent.path.clone()),
            ("HOME".to_string(), self.dir.display().to_string()),
            ("HOSTNAME".to_string(), self.pod.name_any()),
        ];
        if let Some(k) = &self.kubeconfig {
            full_env.push(("KUBECONFIG".into(), k.kubeconfig.display().to_string()));
        }
        for (k, v) in container_env {
            match full_env.iter_mut().find(|(n, _)| *n == k) {
                Some(slot) => slot.1 = v,
                None => full_env.push((k, v)),
            }
        }
        let lookup = |n: &str| {
            full_env
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        let args: Vec<String> = pre_args
            .iter()
            .chain(spec.args.iter().flatten())
            .map(|a| env::expand(a, lookup))
            .collect();
        let c = &mut self.containers[i];
        let restarting = c.run > 0 || c.view.last_terminated.is_some();
        c.run += 1;
        let pid = process::spawn(
            Launch {
                program: &program,
                args: &args,
                env: &full_env,
                dir: &self.dir,
                log: self.dir.join(format!("{}.log", spec.name)),
            },
            i,
            c.run,
            self.exits_tx.clone(),
        )
        .map_err(|e| ("RunContainerError", format!("{e:#}")))?;
        let now = Instant::now();
        if restarting {
            c.view.restart_count += 1;
        }
        c.view.state = State::Running {
            started_at: Timestamp::now(),
        };
        c.view.pid = Some(pid);
        c.start_at = None;
        c.started_instant = Some(now);
        c.kill_at = None;
        c.startup = spec.startup_probe.as_ref().map(|p| ProbeState::new(p, now));
        c.readiness = spec
            .readiness_probe
            .as_ref()
            .map(|p| ProbeState::new(p, now));
        c.liveness = spec
            .liveness_probe
            .as_ref()
            .map(|p| ProbeState::new(p, now));
        c.view.started = c.startup.is_none();
        c.view.ready = c.view.started && c.readiness.is_none();
        info!(pod = %self.name(), container = %spec.name, pid, program = %program.display(), "started container");
        Ok(())
    }

    /// The pod's service-account kubeconfig, unless it opts out of one.
    async fn ensure_credentials(&mut self) -> anyhow::Result<()> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        if self.kubeconfig.is_some() || spec.automount_service_account_token == Some(false) {
            return Ok(());
        }
        let creds = token::PodCredentials::issue(&self.agent, &self.pod, &self.dir).await?;
        self.kubeconfig = Some(creds);
        Ok(())
    }

    async fn sources(&self, spec: &Container) -> anyhow::Result<Sources> {
        let ns = self.pod.namespace().unwrap_or_default();
        let (secret_names, cm_names): (BTreeSet<String>, BTreeSet<String>) = env::references(spec);
        let mut sources = Sources::default();
        let secrets: Api<Secret> = Api::namespaced(self.agent.client.clone(), &ns);
        for name in secret_names {
            if let Some(s) = secrets
                .get_opt(&name)
                .await
                .with_context(|| format!("reading secret {name:?}"))?
            {
                sources.add_secret(&s);
            }
        }
        let cms: Api<ConfigMap> = Api::namespaced(self.agent.client.clone(), &ns);
        for name in cm_names {
            if let Some(c) = cms
                .get_opt(&name)
                .await
                .with_context(|| format!("reading configmap {name:?}"))?
            {
                sources.add_config_map(&c);
            }
        }
        Ok(sources)
    }

    fn fields(&self) -> PodFields {
        let spec = self.pod.spec.clone().unwrap_or_default();
        PodFields {
            name: self.pod.name_any(),
            namespace: self.pod.namespace().unwrap_or_default(),
            uid: self.pod.uid().unwrap_or_default(),
            labels: self.pod.labels().clone(),
            annotations: self.pod.annotations().clone(),
            node_name: self.agent.node_name.clone(),
            service_account: spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            pod_ip: self.pod_ip().map(|i| i.to_string()).unwrap_or_default(),
            host_ip: self.agent.host_ip.clone(),
        }
    }

    fn pod_ip(&self) -> Option<IpAddr> {
        self.ip.as_ref().map(|i| IpAddr::V4(i.ip))
    }

    fn exited(&mut self, exit: Exit) {
        let policy = self.restart_policy();
        let terminating = self.terminating.is_some();
        let name = self.name();
        let backoff_initial = self.agent.backoff_initial;
        let backoff_max = self.agent.backoff_max;
        let Some(c) = self.containers.get_mut(exit.container) else {
            return;
        };
        if exit.run != c.run {
            return;
        }
        let started_at = match c.view.state {
            State::Running { started_at } => started_at,
            _ => Timestamp::now(),
        };
        let t = Terminated::new(exit.code, exit.signal, started_at, Timestamp::now());
        info!(pod = %name, container = %c.view.name, exit_code = t.exit_code, "container exited");
        c.view.pid = None;
        c.view.ready = false;
        c.kill_at = None;
        let restart = !terminating
            && match policy.as_str() {
                "Always" => true,
                "OnFailure" => t.exit_code != 0,
                _ => false,
            };
        if restart {
            // As the kubelet: the first restart is immediate, later ones back off
            // (doubling), and a container that ran long enough starts over.
            let ran_long = c
                .started_instant
                .is_some_and(|s| s.elapsed() >= BACKOFF_RESET_AFTER);
            if ran_long {
                c.backoff = Duration::ZERO;
            }
            let delay = c.backoff;
            c.backoff = if delay.is_zero() {
                backoff_initial
            } else {
                (delay * 2).min(backoff_max)
            };
            c.view.state = State::Waiting {
                reason: if delay.is_zero() {
                    "ContainerCreating"
                } else {
                    "CrashLoopBackOff"
                }
                .into(),
                message: (!delay.is_zero()).then(|| {
                    format!(
                        "back-off {delay:?} restarting failed container={} pod={name}",
                        c.view.name
                    )
                }),
            };
            c.view.last_terminated = Some(t);
            c.start_at = Some(Instant::now() + delay);
        } else {
            c.view.state = State::Terminated(t);
            c.start_at = None;
        }
    }

    async fn timers(&mut self) {
        let now = Instant::now();
        if let Some(k) = &self.kubeconfig
            && k.refresh_at <= now
            && let Err(e) = token::PodCredentials::refresh(&self.agent, &self.pod, &self.dir)
                .await
                .map(|c| self.kubeconfig = Some(c))
        {
            warn!(pod = %self.name(), "refreshing the service account token: {e:#}");
            if let Some(k) = &mut self.kubeconfig {
                k.refresh_at = now + Duration::from_secs(10);
            }
        }
        if let Some(deadline) = self.terminating
            && deadline <= now
        {
            for c in &self.containers {
                if let Some(pid) = c.running_pid() {
                    warn!(pod = %self.name(), container = %c.view.name, "grace period over: SIGKILL");
                    process::signal_group(pid, libc::SIGKILL);
                }
            }
        }
        let grace = self.grace_period();
        let ip = self.pod_ip();
        for c in &mut self.containers {
            let Some(pid) = c.running_pid() else { continue };
            if let Some(kill_at) = c.kill_at
                && kill_at <= now
            {
                process::signal_group(pid, libc::SIGKILL);
            }
            let (Some(ip), None) = (ip, self.terminating) else {
                continue;
            };
            if let Some(p) = c.startup.as_mut().filter(|_| !c.view.started)
                && p.next_at <= now
            {
                let ok = probe(p, &c.spec, ip).await;
                match p.record(ok, Instant::now()) {
                    Some(true) => c.view.started = true,
                    Some(false) => restart_unhealthy(c, pid, grace),
                    None => {}
                }
                if !c.view.started {
                    continue;
                }
                c.view.ready = c.readiness.is_none();
            }
            if !c.view.started {
                continue;
            }
            if let Some(p) = c.readiness.as_mut()
                && p.next_at <= now
            {
                let ok = probe(p, &c.spec, ip).await;
                if let Some(passing) = p.record(ok, Instant::now()) {
                    c.view.ready = passing;
                }
            }
            if let Some(p) = c.liveness.as_mut()
                && p.next_at <= now
                && c.kill_at.is_none()
            {
                let ok = probe(p, &c.spec, ip).await;
                if p.record(ok, Instant::now()) == Some(false) {
                    restart_unhealthy(c, pid, grace);
                }
            }
        }
    }

    fn grace_period(&self) -> Duration {
        let meta = self.pod.metadata.deletion_grace_period_seconds;
        let spec = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds);
        Duration::from_secs(meta.or(spec).unwrap_or(30).max(0) as u64)
    }

    fn begin_termination(&mut self) {
        let grace = if self.gone {
            Duration::from_secs(2).min(self.grace_period())
        } else {
            self.grace_period()
        };
        info!(pod = %self.name(), ?grace, "stopping pod: SIGTERM");
        self.terminating = Some(Instant::now() + grace);
        for c in &mut self.containers {
            c.start_at = None;
            if let Some(pid) = c.running_pid() {
                process::signal(pid, libc::SIGTERM);
            }
        }
    }

    /// Every process has ended: report it and delete the pod with no further grace, so
    /// its controller sees it gone.
    async fn finish(mut self) -> anyhow::Result<()> {
        if self.gone {
            return Ok(());
        }
        for c in &mut self.containers {
            if matches!(c.view.state, State::Waiting { .. }) && c.view.last_terminated.is_some() {
                let t = c.view.last_terminated.clone().expect("checked");
                c.view.state = State::Terminated(t);
            }
        }
        self.report().await;
        let uid = self.pod.uid();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..Default::default()
        };
        loop {
            match self.api.delete(&self.pod.name_any(), &params).await {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => break,
                Err(e) => {
                    warn!(pod = %self.name(), "deleting the pod: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        info!(pod = %self.name(), "pod stopped and deleted");
        Ok(())
    }

    async fn stop_for_agent_shutdown(mut self) -> anyhow::Result<()> {
        let running: Vec<u32> = self
            .containers
            .iter()
            .filter_map(Run::running_pid)
            .collect();
        for pid in &running {
            process::signal(*pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + self.grace_period().min(AGENT_STOP_GRACE);
        let mut left = running.len();
        while left > 0 {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some(_)) => left -= 1,
                _ => break,
            }
        }
        for pid in running {
            process::signal_group(pid, libc::SIGKILL);
        }
        Ok(())
    }

    /// Writes the status when it changed.
    async fn report(&mut self) {
        if self.gone {
            return;
        }
        let policy = self.restart_policy();
        let ip = self.pod_ip().map(|i| i.to_string());
        let views: Vec<ContainerView> = self.containers.iter().map(|c| c.view.clone()).collect();
        let previous = self.reported.clone().or_else(|| self.pod.status.clone());
        let facts = PodFacts {
            restart_policy: &policy,
            pod_ip: ip.as_deref(),
            host_ip: &self.agent.host_ip,
            start_time: self.start_time,
            previous: previous.as_ref(),
            now: Timestamp::now(),
        };
        let desired = status::pod_status(&facts, &views);
        if self.reported.as_ref() == Some(&desired) {
            return;
        }
        let patch = serde_json::json!({"status": desired});
        match self
            .api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                self.reported = Some(desired);
                self.report_retry_at = None;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => self.gone = true,
            Err(e) => {
                warn!(pod = %self.name(), "writing the pod status: {e}");
                self.report_retry_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }
}

/// Liveness (or startup) failed: stop the process so its restart policy restarts it.
fn restart_unhealthy(c: &mut Run, pid: u32, grace: Duration) {
    warn!(container = %c.view.name, "probe failed: restarting the container");
    process::signal(pid, libc::SIGTERM);
    c.kill_at = Some(Instant::now() + grace);
    c.view.ready = false;
}

async fn probe(p: &ProbeState, spec: &Container, ip: IpAddr) -> bool {
    match crate::probe::run(&p.probe, spec, ip).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(container = %spec.name, "probe failed: {e}");
            false
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
