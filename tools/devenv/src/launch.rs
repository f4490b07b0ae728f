//! Starts and stops the environment's processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;

use crate::EnvInfo;
use crate::proc::{Proc, free_port, http_get, port_open, run};

/// Where the components come from: the cache the `tools/install-*.sh` scripts fill.
#[derive(Clone, Debug)]
pub struct Components {
    /// Directory with etcd, kube-apiserver, kube-controller-manager and kubectl.
    pub k8s_bin: PathBuf,
    /// Directory with Kafka's jars.
    pub kafka_lib: PathBuf,
    /// Directory with PostgreSQL's server binaries (initdb, postgres).
    pub postgres_bin: PathBuf,
    /// The helm binary.
    pub helm: PathBuf,
}

impl Components {
    /// Asks each install script for its component: instant when cached, otherwise it
    /// fetches or builds it (with progress on standard error).
    pub fn install(repo_root: &Path) -> anyhow::Result<Self> {
        let script = |name: &str| -> anyhow::Result<PathBuf> {
            let path = repo_root.join("tools").join(name);
            let out = Command::new("bash")
                .arg(&path)
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", path.display()))?;
            if !out.status.success() {
                bail!(
                    "{} failed ({}): see the messages above",
                    path.display(),
                    out.status
                );
            }
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let installed = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
            if !installed.exists() {
                bail!(
                    "{} printed {stdout:?}, not the path of what it installed",
                    path.display()
                );
            }
            Ok(installed)
        };
        Ok(Self {
            k8s_bin: script("install-k8s.sh")?,
            kafka_lib: script("install-kafka.sh")?,
            postgres_bin: script("install-postgres.sh")?,
            helm: script("install-helm.sh")?,
        })
    }
}

/// A running environment. Dropping it stops every process.
pub struct Environment {
    /// What clients need to reach it.
    pub info: EnvInfo,
    procs: Vec<Proc>,
    keep_state: bool,
    brokers: usize,
}

const KAFKA_ADMIN_USER: &str = "admin";
const ADMIN_TOKEN_USER: &str = "eventops-admin";
/// The Node the node agent registers.
pub const NODE_NAME: &str = "eventops-local";

impl Environment {
    /// Starts etcd, kube-apiserver, kube-controller-manager, Kafka and PostgreSQL with
    /// their data in `state_dir`, and returns once each answers.
    pub fn start(
        components: &Components,
        state_dir: &Path,
        keep_state: bool,
        brokers: usize,
    ) -> anyhow::Result<Self> {
        if brokers == 0 {
            bail!("--brokers must be at least 1");
        }
        std::fs::create_dir_all(state_dir)?;
        let state_dir = state_dir.canonicalize()?;
        // PostgreSQL runs as its own user and must be able to reach its directory.
        set_mode(&state_dir, 0o755)?;
        let logs = state_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let secret = random_hex(16)?;

        let mut env = Environment {
            info: EnvInfo {
                state_dir: state_dir.clone(),
                kubeconfig: state_dir.join("kubeconfig"),
                kube_api_url: String::new(),
                kafka_bootstrap: String::new(),
                kafka_sasl_mechanism: "SCRAM-SHA-512".into(),
                kafka_admin_user: KAFKA_ADMIN_USER.into(),
                kafka_admin_password: format!("admin-{secret}"),
                kafka_admin_properties: state_dir.join("kafka/admin.properties"),
                kafka_lib: components.kafka_lib.clone(),
                postgres_url: String::new(),
                kubectl: components.k8s_bin.join("kubectl"),
                helm: components.helm.clone(),
                node_name: NODE_NAME.into(),
                kafka_brokers: brokers,
            },
            procs: Vec::new(),
            keep_state,
            brokers,
        };
        let started = Instant::now();
        // Kafka's JVM takes the longest to come up; start it first and check it last.
        let kafka_ports = env.start_kafka(components)?;
        env.start_postgres(components)?;
        env.start_kubernetes(components, &secret)?;
        env.wait_kafka(&kafka_ports)?;
        eprintln!(
            "[devenv] environment ready in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(env)
    }

    /// Writes `env.json` (atomically: its presence means the environment is ready) and
    /// `env.sh` for shells.
    pub fn write_env_files(&self) -> anyhow::Result<PathBuf> {
        let dir = &self.info.state_dir;
        let info = &self.info;
        let sh = format!(
            "# Source this file to use the EventOps development environment.\n\
             export KUBECONFIG='{}'\nexport EVENTOPS_ENV='{}'\n\
             export EVENTOPS_KAFKA_BOOTSTRAP='{}'\nexport EVENTOPS_KAFKA_SASL_MECHANISM='{}'\n\
             export EVENTOPS_KAFKA_USERNAME='{}'\nexport EVENTOPS_KAFKA_PASSWORD='{}'\n\
             export EVENTOPS_POSTGRES_URL='{}'\nexport PATH='{}':'{}':\"$PATH\"\n\
             # Kafka's own command-line tools as the super user, e.g.\n\
             #   kafka_tool org.apache.kafka.tools.TopicCommand --list\n\
             kafka_tool() {{ java -Xmx256m -Dlog4j2.configurationFile='{}' -cp '{}/*' \"$1\" \
             --bootstrap-server '{}' --command-config '{}' \"${{@:2}}\"; }}\n",
            info.kubeconfig.display(),
            dir.join("env.json").display(),
            info.kafka_bootstrap,
            info.kafka_sasl_mechanism,
            info.kafka_admin_user,
            info.kafka_admin_password,
            info.postgres_url,
            info.kubectl.parent().unwrap_or(Path::new("/")).display(),
            info.helm.parent().unwrap_or(Path::new("/")).display(),
            dir.join("kafka/tools-log4j2.properties").display(),
            info.kafka_lib.display(),
            info.kafka_bootstrap,
            info.kafka_admin_properties.display(),
        );
        std::fs::write(dir.join("env.sh"), sh)?;
        set_mode(&dir.join("env.sh"), 0o600)?;
        let tmp = dir.join("env.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
        let path = dir.join("env.json");
        set_mode(&tmp, 0o600)?;
        std::fs::rename(tmp, &path)?;
        Ok(path)
    }

    /// Fails if any process has died, unless it was stopped on request.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }

    /// Carries out the fault requests that [`EnvInfo::fault`] left in `faults/`: stops
    /// (SIGTERM or the component's clean-stop signal, then SIGKILL after 20 s), kills
    /// (SIGKILL) or starts a component again, with its data, ports and command line, and
    /// acknowledges each request.
    pub fn handle_faults(&mut self) -> anyhow::Result<()> {
        let dir = self.info.state_dir.join(crate::FAULTS_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "done" || e == "tmp") {
                continue;
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let request = std::fs::read_to_string(&path)?;
            std::fs::remove_file(&path)?;
            let (action, nonce) = request
                .trim()
                .split_once(' ')
                .unwrap_or((request.trim(), ""));
            let outcome = match self.procs.iter_mut().find(|p| p.name == name) {
                None => format!("error no component named {name}"),
                Some(proc) => match crate::Fault::parse(action) {
                    None => format!("error unknown action {action}"),
                    Some(fault) => {
                        eprintln!("[devenv] fault: {action} {name}");
                        match fault {
                            crate::Fault::Stop => proc.stop(Duration::from_secs(20)),
                            crate::Fault::Kill => proc.stop(Duration::ZERO),
                            crate::Fault::Start => proc.start()?,
                        }
                        "ok".to_string()
                    }
                },
            };
            let done = dir.join(format!("{name}.done"));
            std::fs::write(&done, format!("{nonce} {outcome}"))?;
        }
        Ok(())
    }

    fn start_kubernetes(&mut self, c: &Components, secret: &str) -> anyhow::Result<()> {
        let dir = self.info.state_dir.join("kube");
        std::fs::create_dir_all(&dir)?;
        let pki = make_pki(&dir)?;
        let token = format!("token-{secret}");
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},system:masters\n"),
        )?;
        set_mode(&dir.join("tokens.csv"), 0o600)?;

        // etcd
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd = recipe(
            c.k8s_bin.join("etcd"),
            [
                "--name=eventops",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                &format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                &format!("--initial-cluster=eventops=http://127.0.0.1:{peer_port}"),
                // A throw-away local store: durability across power loss buys nothing here.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        );
        let mut etcd = Proc::spawn("etcd", etcd, &self.logs(), libc::SIGTERM)?;
        etcd.wait_ready(Duration::from_secs(30), || {
            http_get(etcd_port, "/health").is_some_and(|r| r.contains(r#""health":"true""#))
        })?;
        self.procs.push(etcd);
        eprintln!("[devenv] etcd ready on 127.0.0.1:{etcd_port}");

        // kube-apiserver, flags as controller-runtime's envtest uses them, RBAC on.
        let api_port = free_port()?;
        let p = |f: &str| dir.join(f).display().to_string();
        let apiserver = recipe(
            c.k8s_bin.join("kube-apiserver"),
            [
                &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={api_port}"),
                &format!("--tls-cert-file={}", pki.server_cert.display()),
                &format!("--tls-private-key-file={}", pki.server_key.display()),
                &format!("--client-ca-file={}", pki.ca_cert.display()),
                &format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", pki.sa_public.display()),
                &format!(
                    "--service-account-signing-key-file={}",
                    pki.sa_key.display()
                ),
                &format!("--cert-dir={}", p("apiserver-certs")),
                "--allow-privileged=true",
                // The aggregation layer (APIService objects, e.g. KEDA's
                // external.metrics.k8s.io adapter): kube-apiserver proxies to the extension
                // server with the front-proxy client certificate and the caller's identity in
                // X-Remote-* headers. Routing without kube-proxy: the aggregator resolves a
                // Service of type ExternalName to https://<externalName>:<APIService port>,
                // so an APIService backed by an ExternalName Service `localhost` reaches a
                // server on 127.0.0.1 (Endpoints and EndpointSlices refuse loopback
                // addresses, which rules out --enable-aggregator-routing here).
                &format!(
                    "--requestheader-client-ca-file={}",
                    pki.front_proxy_ca.display()
                ),
                &format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT}"),
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                &format!(
                    "--proxy-client-cert-file={}",
                    pki.front_proxy_client_cert.display()
                ),
                &format!(
                    "--proxy-client-key-file={}",
                    pki.front_proxy_client_key.display()
                ),
                // No kubelets or kube-proxy route to a service IP here: skip the endpoints of
                // the `kubernetes` Service instead of logging that 127.0.0.1 is invalid there.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
        );
        let mut apiserver = Proc::spawn("kube-apiserver", apiserver, &self.logs(), libc::SIGTERM)?;
        self.info.kube_api_url = format!("https://127.0.0.1:{api_port}");
        write_kubeconfig(
            &self.info.kubeconfig,
            &self.info.kube_api_url,
            &pki.ca_cert,
            &token,
        )?;
        let kubectl = self.info.kubectl.clone();
        let kubeconfig = self.info.kubeconfig.clone();
        apiserver.wait_ready(Duration::from_secs(90), || {
            Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        self.procs.push(apiserver);
        eprintln!(
            "[devenv] kube-apiserver ready at {}",
            self.info.kube_api_url
        );

        // kube-controller-manager: garbage collection, namespace deletion,
        // Deployment → ReplicaSet → Pod, service-account tokens.
        let cm_port = free_port()?;
        let cm = recipe(
            c.k8s_bin.join("kube-controller-manager"),
            [
                &format!("--kubeconfig={}", self.info.kubeconfig.display()),
                "--bind-address=127.0.0.1",
                &format!("--secure-port={cm_port}"),
                &format!(
                    "--service-account-private-key-file={}",
                    pki.sa_key.display()
                ),
                &format!("--root-ca-file={}", pki.ca_cert.display()),
                &format!("--cluster-signing-cert-file={}", pki.ca_cert.display()),
                &format!("--cluster-signing-key-file={}", pki.ca_key.display()),
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--controllers=*",
                "--v=1",
            ],
        );
        let mut cm = Proc::spawn("kube-controller-manager", cm, &self.logs(), libc::SIGTERM)?;
        // The service-account controller creating `default` shows the controllers run.
        cm.wait_ready(Duration::from_secs(60), || {
            Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "serviceaccount", "default", "-n", "default"])
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        self.procs.push(cm);
        eprintln!("[devenv] kube-controller-manager running");
        self.start_node_agent()
    }

    /// The EventOps node agent (development stand-in for a kubelet, built from this
    /// workspace next to this executable): pods get bound to its node and run as local
    /// processes. Started last, so it is stopped first.
    fn start_node_agent(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let bin_dir = exe
            .parent()
            .context("devenv's executable has no directory")?;
        let agent_bin = bin_dir.join("eventops-node-agent");
        if !agent_bin.exists() {
            bail!(
                "{} is not built: run `cargo build -p eventops-node-agent` (tools/test and \
                 tools/sandbox build it)",
                agent_bin.display()
            );
        }
        let agent = recipe(
            agent_bin,
            [
                "--kubeconfig".to_string(),
                self.info.kubeconfig.display().to_string(),
                "--state-dir".to_string(),
                self.info.state_dir.display().to_string(),
                "--bin-dir".to_string(),
                bin_dir.display().to_string(),
                "--node-name".to_string(),
                NODE_NAME.to_string(),
                // Shorter than the kubelet's 10s..5m, so crash loops show quickly in tests.
                "--restart-backoff-initial".to_string(),
                "1s".to_string(),
                "--restart-backoff-max".to_string(),
                "20s".to_string(),
            ],
        );
        let mut agent = Proc::spawn("node-agent", agent, &self.logs(), libc::SIGTERM)?;
        let (kubectl, kubeconfig) = (self.info.kubectl.clone(), self.info.kubeconfig.clone());
        agent.wait_ready(Duration::from_secs(60), || {
            Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "node", NODE_NAME, "-o"])
                .arg("jsonpath={.status.conditions[?(@.type==\"Ready\")].status}")
                .output()
                .is_ok_and(|o| o.stdout == b"True")
        })?;
        self.procs.push(agent);
        eprintln!("[devenv] node agent running: node {NODE_NAME} is Ready");
        Ok(())
    }

    /// Formats and starts `self.brokers` combined broker+controller nodes (KRaft, one
    /// static quorum). One node is named `kafka`; of several, node N is `kafka-N`.
    fn start_kafka(&mut self, c: &Components) -> anyhow::Result<Vec<u16>> {
        let dir = self.info.state_dir.join("kafka");
        std::fs::create_dir_all(&dir)?;
        let n = self.brokers;
        let ports = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<Vec<(u16, u16)>>>()?;
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, cport))| format!("{}@127.0.0.1:{cport}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        // Three or more brokers: what production runs (RF 3, writes survive one broker
        // down); fewer: everything on what there is.
        let rf = n.min(3);
        let min_isr = if rf >= 3 { 2 } else { 1 };
        let password = self.info.kafka_admin_password.clone();
        let jaas = format!(
            "org.apache.kafka.common.security.scram.ScramLoginModule required \
             username=\"{KAFKA_ADMIN_USER}\" password=\"{password}\";"
        );
        std::fs::write(
            &self.info.kafka_admin_properties,
            format!(
                "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config={jaas}\n"
            ),
        )?;
        set_mode(&self.info.kafka_admin_properties, 0o600)?;
        let log4j = dir.join("log4j2.properties");
        std::fs::write(&log4j, log4j_config("INFO", "SYSTEM_OUT"))?;
        std::fs::write(
            dir.join("tools-log4j2.properties"),
            log4j_config("WARN", "SYSTEM_ERR"),
        )?;
        let (kafka_lib, log4j) = (c.kafka_lib.clone(), log4j.clone());
        let java = move |main: &str, heap: &str| {
            let mut cmd = Command::new("java");
            cmd.arg(format!("-Xmx{heap}"))
                .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
                .arg("-cp")
                .arg(format!("{}/*", kafka_lib.display()))
                .arg(main);
            cmd
        };
        // Several JVMs share two cores: a smaller heap each.
        let heap = if n == 1 { "1g" } else { "512m" };
        let cluster_id = kafka_uuid()?;
        let mut bootstrap = Vec::new();
        for (i, &(port, controller_port)) in ports.iter().enumerate() {
            let id = i + 1;
            let (name, data) = (kafka_proc_name(n, id), kafka_data_dir(&dir, n, id));
            let properties = format!(
                "process.roles=broker,controller\n\
                 node.id={id}\n\
                 controller.quorum.voters={voters}\n\
                 listeners=SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
                 advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}\n\
                 listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 inter.broker.listener.name=SASL_PLAINTEXT\n\
                 controller.listener.names=CONTROLLER\n\
                 sasl.enabled.mechanisms=SCRAM-SHA-512\n\
                 sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512\n\
                 listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={jaas}\n\
                 authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n\
                 allow.everyone.if.no.acl.found=false\n\
                 # The controller listener is PLAINTEXT on loopback, where broker registration\n\
                 # runs as ANONYMOUS; clients only ever reach the SASL listener.\n\
                 super.users=User:{KAFKA_ADMIN_USER};User:ANONYMOUS\n\
                 log.dirs={data}\n\
                 num.partitions=1\n\
                 default.replication.factor={rf}\n\
                 min.insync.replicas={min_isr}\n\
                 offsets.topic.replication.factor={rf}\n\
                 offsets.topic.num.partitions=10\n\
                 transaction.state.log.replication.factor={rf}\n\
                 transaction.state.log.min.isr={min_isr}\n\
                 share.coordinator.state.topic.replication.factor={rf}\n\
                 share.coordinator.state.topic.min.isr={min_isr}\n\
                 group.initial.rebalance.delay.ms=0\n\
                 # Kafka 4.3.1 loses every SCRAM credential when a restart replays a user's\n\
                 # removal into an image with no snapshot under it (ScramDelta.apply drops\n\
                 # the mechanism's map it empties, then fills the dropped copy). With a\n\
                 # snapshot, which always holds the super user, no removal empties the map.\n\
                 # `wait_kafka` waits for the first one. Test: tests/tests/broker_restart.rs.\n\
                 metadata.log.max.snapshot.interval.ms={SNAPSHOT_INTERVAL_MS}\n\
                 # Kafka's default: tests then catch a client that creates topics by accident.\n\
                 auto.create.topics.enable=true\n",
                data = data.display(),
            );
            let server_properties = dir.join(if n == 1 {
                "server.properties".to_string()
            } else {
                format!("server-{id}.properties")
            });
            std::fs::write(&server_properties, properties)?;
            // It holds the super user's password.
            set_mode(&server_properties, 0o600)?;
            run(java("kafka.tools.StorageTool", "256m").args([
                "format",
                &format!("--cluster-id={cluster_id}"),
                "--config",
                &server_properties.display().to_string(),
                "--add-scram",
                &format!("SCRAM-SHA-512=[name={KAFKA_ADMIN_USER},password={password}]"),
            ]))
            .with_context(|| format!("formatting the storage of {name}"))?;
            let java = java.clone();
            let broker = move || {
                let mut cmd = java("kafka.Kafka", heap);
                cmd.arg(&server_properties);
                cmd
            };
            let proc = Proc::spawn(name, broker, &self.logs(), libc::SIGTERM)?;
            self.procs.push(proc);
            bootstrap.push(format!("127.0.0.1:{port}"));
        }
        self.info.kafka_bootstrap = bootstrap.join(",");
        self.info.kafka_brokers = n;
        Ok(ports.into_iter().map(|(port, _)| port).collect())
    }

    fn wait_kafka(&mut self, ports: &[u16]) -> anyhow::Result<()> {
        let config = self.info.kafka_admin_config();
        let admin: AdminClient<DefaultClientContext> =
            config.create().context("creating a Kafka admin client")?;
        let brokers = ports.len();
        for (i, &port) in ports.iter().enumerate() {
            let name = kafka_proc_name(brokers, i + 1);
            let proc = self
                .procs
                .iter_mut()
                .find(|p| p.name == name)
                .expect("kafka was started");
            proc.wait_ready(Duration::from_secs(120), || port_open(port))?;
            // Metadata through the SASL listener that lists every broker proves the
            // cluster has formed and serves authenticated clients.
            proc.wait_ready(Duration::from_secs(60), || {
                admin
                    .inner()
                    .fetch_metadata(None, Duration::from_secs(2))
                    .is_ok_and(|m| m.brokers().len() == brokers)
            })?;
            // See `SNAPSHOT_INTERVAL_MS`: a restart before the first snapshot can lose
            // every SCRAM credential.
            let metadata = kafka_data_dir(&self.info.state_dir.join("kafka"), brokers, i + 1)
                .join("__cluster_metadata-0");
            proc.wait_ready(Duration::from_secs(60), || {
                std::fs::read_dir(&metadata).is_ok_and(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.path().extension().is_some_and(|x| x == "checkpoint"))
                })
            })
            .context("waiting for Kafka's first metadata snapshot")?;
        }
        eprintln!(
            "[devenv] kafka ready on {} ({brokers} broker(s), SASL/SCRAM-SHA-512, ACLs enforced)",
            self.info.kafka_bootstrap
        );
        Ok(())
    }

    fn start_postgres(&mut self, c: &Components) -> anyhow::Result<()> {
        let dir = self.info.state_dir.join("postgres");
        let data = dir.join("data");
        std::fs::create_dir_all(&dir)?;
        // PostgreSQL refuses to run as root; run it as Debian's `postgres` user then.
        let owner = if unsafe { libc::geteuid() } == 0 {
            let uid: u32 = run(Command::new("id").args(["-u", "postgres"]))
                .context("PostgreSQL cannot run as root and there is no 'postgres' user")?
                .trim()
                .parse()?;
            let gid: u32 = run(Command::new("id").args(["-g", "postgres"]))?
                .trim()
                .parse()?;
            run(Command::new("chown").arg(format!("{uid}:{gid}")).arg(&dir))?;
            Some((uid, gid))
        } else {
            None
        };
        let as_owner = move |program: PathBuf| {
            let mut cmd = Command::new(program);
            if let Some((uid, gid)) = owner {
                use std::os::unix::process::CommandExt;
                cmd.uid(uid).gid(gid);
            }
            cmd
        };
        run(as_owner(c.postgres_bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]))
        .context("initdb")?;
        let port = free_port()?;
        let (bin, socket_dir) = (c.postgres_bin.join("postgres"), dir.clone());
        let postgres = move || {
            let mut cmd = as_owner(bin.clone());
            cmd.arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(&socket_dir)
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                .args(["-c", "max_connections=200"]);
            cmd
        };
        // SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions and stop.
        let mut proc = Proc::spawn("postgres", postgres, &self.logs(), libc::SIGINT)?;
        let pg_isready = c.postgres_bin.join("pg_isready");
        proc.wait_ready(Duration::from_secs(30), || {
            Command::new(&pg_isready)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
        self.procs.push(proc);
        self.info.postgres_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        eprintln!("[devenv] postgres ready on 127.0.0.1:{port}");
        Ok(())
    }

    fn logs(&self) -> PathBuf {
        self.info.state_dir.join("logs")
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        // Reverse start order: nothing loses a server it depends on while stopping.
        while let Some(mut proc) = self.procs.pop() {
            proc.stop(Duration::from_secs(20));
        }
        if !self.keep_state {
            let _ = std::fs::remove_dir_all(&self.info.state_dir);
        }
    }
}

struct Pki {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    sa_key: PathBuf,
    sa_public: PathBuf,
    /// The aggregation layer's CA: kube-apiserver presents a client certificate it signed
    /// (`front_proxy_client_*`) when it proxies to an extension API server (such as KEDA's
    /// metrics adapter), which then trusts the `X-Remote-*` headers of such requests.
    front_proxy_ca: PathBuf,
    front_proxy_client_cert: PathBuf,
    front_proxy_client_key: PathBuf,
}

/// The common name of the aggregation layer's client certificate, the only name
/// extension API servers accept `X-Remote-*` headers from (`--requestheader-allowed-names`).
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// A CA, a serving certificate for 127.0.0.1, a service-account signing key, and the
/// aggregation layer's CA and client certificate, made with the openssl command-line tool.
fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    let f = |n: &str| dir.join(n);
    let pki = Pki {
        ca_cert: f("ca.crt"),
        ca_key: f("ca.key"),
        server_cert: f("apiserver.crt"),
        server_key: f("apiserver.key"),
        sa_key: f("sa.key"),
        sa_public: f("sa.pub"),
        front_proxy_ca: f("front-proxy-ca.crt"),
        front_proxy_client_cert: f("front-proxy-client.crt"),
        front_proxy_client_key: f("front-proxy-client.key"),
    };
    new_ca(&pki.ca_key, &pki.ca_cert, "eventops-local-ca")
        .context("creating the local CA (is openssl installed?)")?;
    sign(
        (&pki.ca_cert, &pki.ca_key),
        "kube-apiserver",
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,\
         DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n",
        (&pki.server_key, &pki.server_cert),
    )?;
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .arg("-out")
        .arg(&pki.sa_key))?;
    run(Command::new("openssl")
        .args(["pkey", "-pubout"])
        .arg("-in")
        .arg(&pki.sa_key)
        .arg("-out")
        .arg(&pki.sa_public))?;
    // The aggregation layer's own CA and the client certificate kube-apiserver proxies
    // with, as kubeadm makes them (a CA apart from the cluster CA: a client certificate of
    // the cluster CA must not be able to assert any user through `X-Remote-User`).
    let front_proxy_key = f("front-proxy-ca.key");
    new_ca(
        &front_proxy_key,
        &pki.front_proxy_ca,
        "eventops-front-proxy-ca",
    )
    .context("creating the front-proxy CA")?;
    sign(
        (&pki.front_proxy_ca, &front_proxy_key),
        FRONT_PROXY_CLIENT,
        "extendedKeyUsage=clientAuth\n",
        (&pki.front_proxy_client_key, &pki.front_proxy_client_cert),
    )?;
    Ok(pki)
}

/// openssl's arguments for a new P-256 key, unencrypted.
const NEW_EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A self-signed CA named `cn`, valid 30 days: its key at `key`, its certificate at `cert`.
pub fn new_ca(key: &Path, cert: &Path, cn: &str) -> anyhow::Result<()> {
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(NEW_EC_KEY)
        .args(["-days", "30", "-subj", &format!("/CN={cn}")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert))
    .map(drop)
}

/// A new key and a certificate for `cn` signed by `ca` (certificate, key), valid 30 days,
/// with the extensions in `usage` (extendedKeyUsage, subjectAltName) on top of a leaf's
/// basic ones; written to `out` (key, certificate), the request beside them.
pub fn sign(ca: (&Path, &Path), cn: &str, usage: &str, out: (&Path, &Path)) -> anyhow::Result<()> {
    let (key, cert) = out;
    let csr = cert.with_extension("csr");
    let ext = cert.with_extension("ext");
    run(Command::new("openssl")
        .arg("req")
        .args(NEW_EC_KEY)
        .args(["-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(&csr))?;
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{usage}"
        ),
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "30"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(ca.0)
        .arg("-CAkey")
        .arg(ca.1)
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(cert))
    .map(drop)
}

/// How often (at most) a Kafka node writes a metadata snapshot, in milliseconds (Kafka's
/// default: an hour). A restart starts from the last one; see `start_kafka`.
const SNAPSHOT_INTERVAL_MS: u64 = 5_000;

/// The data directory of Kafka node `id` (from 1) in a cluster of `brokers`, under the
/// environment's `kafka` directory.
fn kafka_data_dir(kafka_dir: &Path, brokers: usize, id: usize) -> PathBuf {
    if brokers == 1 {
        kafka_dir.join("data")
    } else {
        kafka_dir.join(format!("data-{id}"))
    }
}

/// The process name of Kafka node `id` (from 1) in a cluster of `brokers`.
pub fn kafka_proc_name(brokers: usize, id: usize) -> String {
    if brokers == 1 {
        "kafka".into()
    } else {
        format!("kafka-{id}")
    }
}

/// A command line to start (and restart) a component with.
fn recipe<S: AsRef<str>>(
    program: PathBuf,
    args: impl IntoIterator<Item = S>,
) -> impl FnMut() -> Command + Send + 'static {
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    move || {
        let mut cmd = Command::new(&program);
        cmd.args(&args);
        cmd
    }
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "eventops-local", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": ADMIN_TOKEN_USER, "user": {"token": token}}],
        "contexts": [{"name": "eventops-local", "context": {
            "cluster": "eventops-local", "user": ADMIN_TOKEN_USER, "namespace": "default",
        }}],
        "current-context": "eventops-local",
    });
    // JSON is YAML: kubectl and kube-rs read it as a kubeconfig.
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
    set_mode(path, 0o600)?;
    Ok(())
}

fn log4j_config(level: &str, target: &str) -> String {
    format!(
        "status = warn\n\
         appender.out.type = Console\n\
         appender.out.name = OUT\n\
         appender.out.target = {target}\n\
         appender.out.layout.type = PatternLayout\n\
         appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = {level}\n\
         rootLogger.appenderRef.out.ref = OUT\n\
         logger.kafka.name = kafka\nlogger.kafka.level = {level}\n\
         logger.raft.name = org.apache.kafka.raft\nlogger.raft.level = WARN\n"
    )
}

/// A Kafka cluster id: 16 random bytes, base64url without padding (Kafka's `Uuid`). Like
/// Kafka's own `Uuid.randomUuid()`, an id starting with '-' is drawn again: command-line
/// parsers take it for an option.
fn kafka_uuid() -> anyhow::Result<String> {
    loop {
        let id = encode_uuid(random_bytes::<16>()?);
        if !id.starts_with('-') {
            return Ok(id);
        }
    }
}

fn encode_uuid(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = String::new();
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        nbits += 8;
        while nbits >= 6 {
            nbits -= 6;
            out.push(ALPHABET[((bits >> nbits) & 0x3f) as usize] as char);
        }
    }
    if nbits > 0 {
        out.push(ALPHABET[((bits << (6 - nbits)) & 0x3f) as usize] as char);
    }
    out
}

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    use std::io::Read;
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    let bytes = random_bytes::<32>()?;
    Ok(bytes[..n.min(32)]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_never_start_with_a_dash() {
        // 0xf8 encodes to '-' as the first character.
        assert!(encode_uuid([0xf8; 16]).starts_with('-'));
        for _ in 0..2000 {
            assert!(!kafka_uuid().unwrap().starts_with('-'));
        }
    }

    #[test]
    fn kafka_uuid_is_22_base64url_chars() {
        let id = kafka_uuid().unwrap();
        assert_eq!(id.len(), 22);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(id, kafka_uuid().unwrap());
    }
}
