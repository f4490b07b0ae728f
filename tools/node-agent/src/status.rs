//! A pod's status as the kubelet reports it, built (purely) from what the agent knows
//! about its processes.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// One container as the agent sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerView {
    /// Container name.
    pub name: String,
    /// The image the spec names.
    pub image: String,
    /// What it is doing now.
    pub state: State,
    /// How its previous run ended, if it ran before.
    pub last_terminated: Option<Terminated>,
    /// Readiness as probed (or started, without a readiness probe).
    pub ready: bool,
    /// Whether it started (its startup probe passed, if it has one).
    pub started: bool,
    /// Times it was restarted.
    pub restart_count: i32,
    /// The process id, while it runs (reported as the container id).
    pub pid: Option<u32>,
}

/// A container's state.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// Not running: not started yet, or waiting to be restarted.
    Waiting {
        /// `ContainerCreating`, `ErrImagePull`, `CrashLoopBackOff`, ...
        reason: String,
        /// Details for humans.
        message: Option<String>,
    },
    /// Its process runs.
    Running {
        /// When the process started.
        started_at: Timestamp,
    },
    /// Its process exited and will not be restarted.
    Terminated(Terminated),
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Terminated {
    /// Exit code; 128 + signal when a signal ended it, like container runtimes report.
    pub exit_code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// `Completed` or `Error`.
    pub reason: String,
    /// When the process started.
    pub started_at: Timestamp,
    /// When it exited.
    pub finished_at: Timestamp,
}

impl Terminated {
    /// A run that ended with `exit_code` (or `signal`).
    pub fn new(
        exit_code: Option<i32>,
        signal: Option<i32>,
        started_at: Timestamp,
        finished_at: Timestamp,
    ) -> Self {
        let exit_code = exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
        Self {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            started_at,
            finished_at,
        }
    }
}

/// The pod phase from its containers, by the kubelet's rules: Pending while a container
/// has never run, Running while one runs or will be restarted, then Succeeded or Failed.
pub fn phase(restart_policy: &str, containers: &[ContainerView]) -> &'static str {
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in containers {
        match (&c.state, &c.last_terminated) {
            (State::Running { .. }, _) => running += 1,
            (State::Terminated(t), _) | (State::Waiting { .. }, Some(t)) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            (State::Waiting { .. }, None) => waiting += 1,
        }
    }
    if waiting > 0 || containers.is_empty() {
        "Pending"
    } else if running > 0 || restart_policy == "Always" {
        // Running, or stopped and about to be restarted.
        "Running"
    } else if stopped == succeeded {
        "Succeeded"
    } else if restart_policy == "Never" {
        "Failed"
    } else {
        "Running"
    }
}

/// Pod-level facts for the status.
#[derive(Clone, Debug)]
pub struct PodFacts<'a> {
    /// `spec.restartPolicy` (`Always` when unset).
    pub restart_policy: &'a str,
    /// The pod's loopback IP, once it has one.
    pub pod_ip: Option<&'a str>,
    /// The node's IP.
    pub host_ip: &'a str,
    /// When the agent accepted the pod.
    pub start_time: Timestamp,
    /// The status the API server has now (transition times and `PodScheduled` are kept).
    pub previous: Option<&'a PodStatus>,
    /// The current time.
    pub now: Timestamp,
}

/// The full status to write.
pub fn pod_status(facts: &PodFacts, containers: &[ContainerView]) -> PodStatus {
    let phase = phase(facts.restart_policy, containers);
    let unready: Vec<&str> = containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let all_ready = unready.is_empty() && !containers.is_empty();
    let previous_conditions = facts
        .previous
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: Option<String>, message: Option<String>| {
        let status = if ok { "True" } else { "False" };
        let before = previous_conditions.iter().find(|c| c.type_ == type_);
        let last_transition_time = match before {
            Some(b) if b.status == status => b.last_transition_time.clone(),
            _ => Some(Time(facts.now)),
        };
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            reason,
            message,
            last_transition_time,
            ..Default::default()
        }
    };
    let not_ready_reason = (!all_ready).then(|| "ContainersNotReady".to_string());
    let not_ready_message =
        (!all_ready).then(|| format!("containers with unready status: [{}]", unready.join(" ")));
    let mut conditions = vec![
        condition("Initialized", true, None, None),
        condition(
            "Ready",
            all_ready,
            not_ready_reason.clone(),
            not_ready_message.clone(),
        ),
        condition(
            "ContainersReady",
            all_ready,
            not_ready_reason,
            not_ready_message,
        ),
    ];
    conditions.push(
        previous_conditions
            .iter()
            .find(|c| c.type_ == "PodScheduled")
            .cloned()
            .unwrap_or_else(|| condition("PodScheduled", true, None, None)),
    );
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(facts.host_ip.into()),
        host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP {
            ip: facts.host_ip.into(),
        }]),
        pod_ip: facts.pod_ip.map(String::from),
        pod_ips: facts.pod_ip.map(|ip| vec![PodIP { ip: ip.into() }]),
        start_time: Some(Time(facts.start_time)),
        container_statuses: Some(containers.iter().map(container_status).collect()),
        qos_class: facts.previous.and_then(|s| s.qos_class.clone()),
        ..Default::default()
    }
}

fn container_status(c: &ContainerView) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        container_id: c.pid.map(|pid| format!("eventops-local://{pid}")),
        ready: c.ready,
        started: Some(c.started),
        restart_count: c.restart_count,
        state: Some(state(&c.state)),
        last_state: c
            .last_terminated
            .as_ref()
            .map(|t| state(&State::Terminated(t.clone()))),
        ..Default::default()
    }
}

fn state(s: &State) -> ContainerState {
    match s {
        State::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        State::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*started_at)),
            }),
            ..Default::default()
        },
        State::Terminated(t) => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: t.exit_code,
                signal: t.signal,
                reason: Some(t.reason.clone()),
                started_at: Some(Time(t.started_at)),
                finished_at: Some(Time(t.finished_at)),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn view(name: &str, state: State) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: format!("{name}:1"),
            state,
            last_terminated: None,
            ready: false,
            started: false,
            restart_count: 0,
            pid: None,
        }
    }

    fn waiting(reason: &str) -> State {
        State::Waiting {
            reason: reason.into(),
            message: None,
        }
    }

    fn exited(code: i32) -> Terminated {
        Terminated::new(Some(code), None, at(1), at(2))
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let running = view("a", State::Running { started_at: at(1) });
        let creating = view("b", waiting("ContainerCreating"));
        let mut crashing = view("c", waiting("CrashLoopBackOff"));
        crashing.last_terminated = Some(exited(1));
        let done = view("d", State::Terminated(exited(0)));
        let failed = view("e", State::Terminated(exited(2)));

        assert_eq!(phase("Always", std::slice::from_ref(&creating)), "Pending");
        assert_eq!(phase("Always", &[running.clone(), creating]), "Pending");
        assert_eq!(phase("Always", std::slice::from_ref(&running)), "Running");
        assert_eq!(phase("Always", &[crashing.clone()]), "Running");
        assert_eq!(phase("OnFailure", &[crashing]), "Running");
        assert_eq!(phase("Never", std::slice::from_ref(&done)), "Succeeded");
        assert_eq!(phase("OnFailure", std::slice::from_ref(&done)), "Succeeded");
        assert_eq!(phase("Never", &[done.clone(), failed.clone()]), "Failed");
        assert_eq!(phase("Never", &[running, failed]), "Running");
        assert_eq!(phase("Always", &[]), "Pending");
    }

    #[test]
    fn signals_are_reported_as_128_plus_the_signal() {
        let t = Terminated::new(None, Some(15), at(1), at(2));
        assert_eq!((t.exit_code, t.reason.as_str()), (143, "Error"));
        assert_eq!(exited(0).reason, "Completed");
    }

    #[test]
    fn status_reports_ip_conditions_and_containers() {
        let mut c = view("worker", State::Running { started_at: at(5) });
        c.ready = true;
        c.started = true;
        c.restart_count = 2;
        c.pid = Some(42);
        c.last_terminated = Some(exited(1));
        let facts = PodFacts {
            restart_policy: "Always",
            pod_ip: Some("127.1.0.3"),
            host_ip: "127.0.0.1",
            start_time: at(3),
            previous: None,
            now: at(10),
        };
        let s = pod_status(&facts, std::slice::from_ref(&c));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("127.1.0.3"));
        assert_eq!(s.pod_ips.as_ref().unwrap()[0].ip, "127.1.0.3");
        assert_eq!(s.host_ip.as_deref(), Some("127.0.0.1"));
        let cond = |s: &PodStatus, t: &str| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .clone()
        };
        for t in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert_eq!(cond(&s, t).status, "True", "{t}");
        }
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            (cs.ready, cs.started, cs.restart_count),
            (true, Some(true), 2)
        );
        assert!(cs.state.as_ref().unwrap().running.is_some());
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.exit_code, 1);

        // Not ready any more: Ready flips with a new transition time, PodScheduled and
        // Initialized keep theirs.
        c.ready = false;
        let later = PodFacts {
            previous: Some(&s),
            now: at(20),
            ..facts
        };
        let s2 = pod_status(&later, &[c]);
        let ready = cond(&s2, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [worker]")
        );
        assert_eq!(ready.last_transition_time, Some(Time(at(20))));
        assert_eq!(
            cond(&s2, "Initialized").last_transition_time,
            Some(Time(at(10)))
        );
    }
}
