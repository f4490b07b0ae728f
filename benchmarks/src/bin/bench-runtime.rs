//! Benchmark of issue 5: the consumer runtime against a plain rdkafka loop and a Spring
//! Kafka listener, on the same broker and topic, 1 KiB records, one worker, manual
//! commits. Prints figures and ratios measured in this run; asserts nothing.
//!
//! Run through `tools/bench-runtime`, which builds everything and starts the environment.
//!
//! Each contender consumes the whole topic from the beginning with a fresh group id, one
//! at a time. Throughput is the record count divided by the wall time from the contender's
//! first record reaching its handler (it prints [`FIRST_RECORD_LINE`]) to the moment an
//! observer here sees the group's committed offsets reach the end of every partition (it
//! asks the broker every 50 ms). Start-up (process start, group join) is reported
//! separately. Peak RSS is `VmHWM` and CPU time `utime + stime` of the contender's process,
//! read from /proc just before it is stopped; CPU per record is that CPU time divided by the
//! record count (start-up included, the same for every contender).
//!
//! Fairness: every contender first runs one warm-up round whose figures are discarded (the
//! broker's page cache, the JVM's class data); Spring runs with listener concurrency equal
//! to the partition count (the runtime runs one task per partition) and a stated `-Xmx`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use eventops_benchmarks::{FIRST_RECORD_LINE, PAYLOAD_BYTES, order_key, order_payload, unix_ms};
use eventops_devenv::EnvInfo;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Parser)]
#[command(about = "Consumer runtime vs plain rdkafka vs Spring Kafka; prints figures")]
struct Args {
    /// Records to produce and consume.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// The Spring Kafka contender's jar (benchmarks/spring-kafka/target/bench-spring-kafka.jar).
    #[arg(long)]
    spring_jar: Option<PathBuf>,
    /// JVM options for the Spring contender (space separated); the heap bound is stated in
    /// the report.
    #[arg(long, default_value = "-Xmx512m")]
    jvm_opts: String,
    /// Rounds of every contender run first and discarded.
    #[arg(long, default_value_t = 1)]
    warmup_rounds: usize,
    /// Records of the PostgreSQL inbox contender's own topic (at most --messages).
    #[arg(long, default_value_t = 100_000)]
    postgres_messages: u64,
    /// Runs of every contender (interleaved); the table shows each contender's median.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Contenders to run, of: fetch-only (the rdkafka loop without per-record work: the
    /// ceiling), rdkafka, runtime, spring (needs --spring-jar), postgres.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fetch-only,rdkafka,runtime,spring,postgres"
    )]
    only: Vec<String>,
    /// Give up on a contender after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

const FETCH_ONLY: &str = "rdkafka loop, no work (ceiling)";
const BASELINE: &str = "rdkafka loop (baseline)";
const RUNTIME: &str = "eventops runtime (Memory)";
const SPRING: &str = "Spring Kafka (MANUAL ack, tuned)";
const POSTGRES: &str = "eventops runtime (Postgres inbox)";

/// Makes the command that starts one run of a contender.
type Launcher<'a> = Box<dyn Fn() -> Command + 'a>;

/// One contender's figures.
struct Figures {
    name: String,
    records: u64,
    /// Every run's records/s, slowest first (filled in for the median).
    all_rates: String,
    startup: Duration,
    elapsed: Duration,
    peak_rss_kib: u64,
    cpu: Duration,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_us_per_record(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.records as f64
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = EnvInfo::from_env()?;
    let topic = format!("bench-runtime-{}", std::process::id());
    create_topic(&env, &topic, args.partitions).await?;
    let ends = produce(&env, &topic, args.partitions, args.messages)?;
    // The inbox path is an order of magnitude slower: it gets its own, smaller topic.
    let pg_messages = args.postgres_messages.min(args.messages);
    let pg_topic = format!("{topic}-postgres");
    let pg_ends = if args.only.iter().any(|c| c == "postgres") {
        create_topic(&env, &pg_topic, args.partitions).await?;
        produce(&env, &pg_topic, args.partitions, pg_messages)?
    } else {
        Vec::new()
    };

    let bin_dir = std::env::current_exe()?
        .parent()
        .context("the benchmark binary has a directory")?
        .to_path_buf();
    let runtime = |mode: &str| {
        let mut c = Command::new(bin_dir.join("bench-eventops-consumer"));
        c.arg(mode);
        c
    };
    let mut contenders: Vec<(&str, Launcher<'_>)> = vec![
        (
            FETCH_ONLY,
            Box::new(|| {
                let mut c = Command::new(bin_dir.join("bench-rdkafka-consumer"));
                c.arg("fetch-only");
                c
            }),
        ),
        (
            BASELINE,
            Box::new(|| Command::new(bin_dir.join("bench-rdkafka-consumer"))),
        ),
        (RUNTIME, Box::new(move || runtime("memory"))),
    ];
    if let Some(jar) = args
        .spring_jar
        .as_ref()
        .filter(|_| args.only.iter().any(|c| c == "spring"))
    {
        let jar = jar.clone();
        let opts = args.jvm_opts.clone();
        contenders.push((
            SPRING,
            Box::new(move || {
                let mut java = Command::new("java");
                java.args(opts.split_whitespace()).arg("-jar").arg(&jar);
                java
            }),
        ));
    }
    contenders.push((POSTGRES, Box::new(move || runtime("postgres"))));
    let key = |name: &str| match name {
        FETCH_ONLY => "fetch-only",
        BASELINE => "rdkafka",
        RUNTIME => "runtime",
        SPRING => "spring",
        _ => "postgres",
    };
    contenders.retain(|(name, _)| args.only.iter().any(|c| c == key(name)));

    let mut results: Vec<Vec<Figures>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.warmup_rounds + args.rounds {
        let warmup = round <= args.warmup_rounds;
        let round = if warmup {
            format!("warm-up {round}")
        } else {
            (round - args.warmup_rounds).to_string()
        };
        for ((name, command), runs) in contenders.iter().zip(&mut results) {
            eprintln!("[bench] round {round}: {name}");
            let (topic, ends, n) = if *name == POSTGRES {
                (&pg_topic, &pg_ends, pg_messages)
            } else {
                (&topic, &ends, args.messages)
            };
            let figures = run(
                &env,
                topic,
                name,
                command(),
                ends,
                n,
                args.partitions,
                Duration::from_secs(args.timeout_secs),
            )?;
            eprintln!(
                "[bench] round {round}: {name}: {:.0} records/s, {:.2} CPU µs/record",
                figures.rate(),
                figures.cpu_us_per_record()
            );
            if !warmup {
                runs.push(figures);
            }
        }
    }
    let results: Vec<Figures> = results
        .into_iter()
        .map(|mut runs| {
            runs.sort_by_key(|f| f.elapsed);
            let all: Vec<String> = runs.iter().map(|f| format!("{:.0}", f.rate())).collect();
            let mut median = runs.swap_remove(runs.len() / 2);
            median.all_rates = all.join(" ");
            median
        })
        .collect();
    report(&results, &args);
    Ok(())
}

async fn create_topic(env: &EnvInfo, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = env.kafka_admin_config().create()?;
    let results = admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// Produces `n` records and returns each partition's end offset.
fn produce(env: &EnvInfo, topic: &str, partitions: i32, n: u64) -> anyhow::Result<Vec<i64>> {
    let producer: ThreadedProducer<DefaultProducerContext> = env
        .kafka_admin_config()
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "262144")
        .create()?;
    let started = Instant::now();
    for i in 0..n {
        let (key, payload) = (order_key(i), order_payload(i));
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let consumer: BaseConsumer = env.kafka_admin_config().create()?;
    let ends = (0..partitions)
        .map(|p| {
            Ok(consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))?
                .1)
        })
        .collect::<anyhow::Result<Vec<i64>>>()?;
    let total: i64 = ends.iter().sum();
    if total != n as i64 {
        bail!("produced {n} records but the topic holds {total}; the producer lost records");
    }
    eprintln!(
        "[bench] produced {n} × {PAYLOAD_BYTES} B records to {topic} ({partitions} partitions) in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(ends)
}

/// Runs one contender to completion and measures it.
// One call per contender; the parameters read best spelled out at each call site.
#[allow(clippy::too_many_arguments)]
fn run(
    env: &EnvInfo,
    topic: &str,
    name: &str,
    mut command: Command,
    ends: &[i64],
    n: u64,
    partitions: i32,
    timeout: Duration,
) -> anyhow::Result<Figures> {
    let group = format!(
        "bench-{}-{}",
        name.split_whitespace().next().unwrap_or("c").to_lowercase(),
        unix_ms()
    );
    let contract: BTreeMap<&str, String> = BTreeMap::from([
        ("EVENTOPS_KAFKA_BOOTSTRAP", env.kafka_bootstrap.clone()),
        ("EVENTOPS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT".into()),
        (
            "EVENTOPS_KAFKA_SASL_MECHANISM",
            env.kafka_sasl_mechanism.clone(),
        ),
        ("EVENTOPS_KAFKA_USERNAME", env.kafka_admin_user.clone()),
        ("EVENTOPS_KAFKA_PASSWORD", env.kafka_admin_password.clone()),
        ("EVENTOPS_GROUP_ID", group.clone()),
        ("EVENTOPS_TOPICS", format!(r#"[{{"topic":"{topic}"}}]"#)),
        ("EVENTOPS_IDEMPOTENCY", "Memory".into()),
        ("EVENTOPS_DEAD_LETTER", "false".into()),
        ("EVENTOPS_HEALTH_PORT", free_port().to_string()),
        ("BENCH_TOPIC", topic.into()),
        ("BENCH_MESSAGES", n.to_string()),
        ("BENCH_CONCURRENCY", partitions.to_string()),
        ("DATABASE_URL", env.postgres_url.clone()),
    ]);
    let spawned = Instant::now();
    let mut child = command
        .envs(contract)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}: {command:?}"))?;
    let result = measure(env, &group, topic, &mut child, ends, spawned, timeout);
    let _ = child.kill();
    let _ = child.wait();
    let (startup, elapsed, peak_rss_kib, cpu) =
        result.with_context(|| format!("measuring {name}"))?;
    Ok(Figures {
        name: name.into(),
        records: n,
        all_rates: String::new(),
        startup,
        elapsed,
        peak_rss_kib,
        cpu,
    })
}

fn measure(
    env: &EnvInfo,
    group: &str,
    topic: &str,
    child: &mut Child,
    ends: &[i64],
    spawned: Instant,
    timeout: Duration,
) -> anyhow::Result<(Duration, Duration, u64, Duration)> {
    let pid = child.id();
    let stdout = child.stdout.take().context("the contender's stdout")?;
    let (first_tx, first_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(ms) = line.strip_prefix(FIRST_RECORD_LINE) {
                let _ = first_tx.send(ms.trim().parse::<u128>());
            } else {
                eprintln!("[contender] {line}");
            }
        }
    });
    let observer: BaseConsumer = env.kafka_admin_config().set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..ends.len() {
        tpl.add_partition(topic, p as i32);
    }
    let mut first_ms = None;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the contender exited early ({status})");
        }
        if spawned.elapsed() > timeout {
            bail!("not all offsets were committed after {timeout:?}");
        }
        if first_ms.is_none()
            && let Ok(ms) = first_rx.try_recv()
        {
            first_ms = Some(ms.context("parsing the first-record time")?);
        }
        // A fresh broker may not have the group's coordinator ready yet (NotCoordinator,
        // CoordinatorLoadInProgress): ask again; the timeout above bounds it.
        let committed = match observer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("[bench] committed offsets not available yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let done = ends.iter().enumerate().all(|(p, end)| {
            matches!(committed.find_partition(topic, p as i32).map(|e| e.offset()),
                Some(Offset::Offset(o)) if o >= *end)
        });
        if done {
            let done_ms = unix_ms();
            let (rss, cpu) = proc_figures(pid)?;
            let first_ms = match first_ms {
                Some(ms) => ms,
                None => first_rx
                    .recv_timeout(Duration::from_secs(5))
                    .context("the contender never printed its first-record line")??,
            };
            let elapsed = Duration::from_millis((done_ms - first_ms) as u64);
            let startup = spawned.elapsed().saturating_sub(elapsed);
            return Ok((startup, elapsed, rss, cpu));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Peak RSS (KiB) and CPU time of a running process.
fn proc_figures(pid: u32) -> anyhow::Result<(u64, Duration)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/<pid>/status")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok((rss, Duration::from_millis(ticks * 1000 / hz)))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}

fn report(results: &[Figures], args: &Args) {
    println!(
        "\n{PAYLOAD_BYTES} B records, {} partitions, one worker each, manual commits; \
         {} warm-up round(s) discarded, then the median of {} run(s) per contender (the \
         Postgres inbox contender has its own topic)",
        args.partitions, args.warmup_rounds, args.rounds
    );
    println!(
        "time: first record at the handler → all offsets committed (seen by the broker, polled every 50 ms)\n\
         startup: process start → first record; peak RSS: VmHWM; CPU: utime + stime of the process, \
         per record: CPU / records\n\
         Spring: Boot 4.0 / spring-kafka 4.0, AckMode.MANUAL, DefaultErrorHandler, listener \
         concurrency {} (= partitions), JVM options: {}\n\
         load average at the end: {}",
        args.partitions,
        if args.jvm_opts.is_empty() {
            "none (defaults)"
        } else {
            &args.jvm_opts
        },
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<34} {:>9} {:>10} {:>8} {:>9} {:>12} {:>8} {:>9}  records/s of every run",
        "contender",
        "records",
        "records/s",
        "time s",
        "startup s",
        "peak RSS MiB",
        "CPU s",
        "CPU µs/rec"
    );
    for f in results {
        println!(
            "{:<34} {:>9} {:>10.0} {:>8.2} {:>9.2} {:>12.1} {:>8.2} {:>9.2}  {}",
            f.name,
            f.records,
            f.rate(),
            f.elapsed.as_secs_f64(),
            f.startup.as_secs_f64(),
            f.peak_rss_kib as f64 / 1024.0,
            f.cpu.as_secs_f64(),
            f.cpu_us_per_record(),
            f.all_rates
        );
    }
    let find = |name: &str| results.iter().find(|f| f.name == name);
    let Some(runtime) = find(RUNTIME) else { return };
    println!("\nratios (this run)                     measured   target");
    let (mut vs_loop, mut cpu_vs_loop, mut vs_spring, mut rss_vs_spring) = (None, None, None, None);
    if let Some(base) = find(BASELINE) {
        let r = runtime.rate() / base.rate();
        println!(
            "runtime / rdkafka records/s           {r:>8.2}×   ≥ 0.90×  {}",
            verdict(r >= 0.9)
        );
        let c = runtime.cpu_us_per_record() / base.cpu_us_per_record();
        println!(
            "runtime / rdkafka CPU per record      {c:>8.2}×   ≤ 1.10×  {}",
            verdict(c <= 1.1)
        );
        (vs_loop, cpu_vs_loop) = (Some(r), Some(c));
    }
    if let Some(spring) = find(SPRING) {
        let r = runtime.rate() / spring.rate();
        println!(
            "runtime / Spring records/s            {r:>8.2}×   ≥ 3.00×  {}",
            verdict(r >= 3.0)
        );
        let m = runtime.peak_rss_kib as f64 / spring.peak_rss_kib as f64;
        println!(
            "runtime / Spring peak RSS             {m:>8.3}×   ≤ 0.25×  {}",
            verdict(m <= 0.25)
        );
        (vs_spring, rss_vs_spring) = (Some(r), Some(m));
        if let Some(ceiling) = find(FETCH_ONLY) {
            println!(
                "3× Spring needs {:.0} records/s; the no-work loop (the broker's and client's \
                 ceiling here) reaches {:.0}, the runtime {:.0}% of it",
                3.0 * spring.rate(),
                ceiling.rate(),
                100.0 * runtime.rate() / ceiling.rate()
            );
        }
    }
    if let Some(pg) = find(POSTGRES) {
        println!(
            "PostgreSQL inbox path                 {:>8.0} records/s (batched transactions; no target)",
            pg.rate()
        );
    }
    // One line for scripts and notes, in a fixed order; a contender left out with --only
    // leaves its ratios out.
    let summary: Vec<String> = [
        ("runtime/rdkafka", vs_loop),
        ("runtime/spring", vs_spring),
        ("rss runtime/spring", rss_vs_spring),
        ("cpu runtime/rdkafka", cpu_vs_loop),
    ]
    .into_iter()
    .filter_map(|(name, v)| Some(format!("{name} {:.2}", v?)))
    .collect();
    if !summary.is_empty() {
        println!("bench-runtime: {}", summary.join(", "));
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
