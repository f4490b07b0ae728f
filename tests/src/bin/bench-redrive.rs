//! Benchmark of issue 13: one `Redrive` with the default settings (no rate limit, up to
//! 10,000 records per Kafka transaction) against a plain copy loop measured in the same
//! run, both moving the same N dead letters back to their original topic and partition
//! as the operator's Kafka user.
//!
//! The copy loop is what teams write by hand today (Spring Kafka leaves DLT replay to
//! the user): read the dead-letter topic from the start to its end, produce each record
//! back with the provenance headers dropped, through an idempotent producer with every
//! send in flight at once, and wait for the acknowledgements. It is at-least-once: a
//! crash in the middle copies records twice, which the Redrive's transactions rule out.
//! SQS's redrive ceiling (500 messages/s) is a published figure, not measured here.
//!
//! Run through `tools/bench-redrive [N]` (default 20,000), which builds in release mode
//! and starts the environment; the operator runs in this process. Prints figures;
//! asserts only that every record moved.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eventops_crds::{EventTopic, Redrive};
use eventops_tests::runtime::{event, producer, topic_record_count};
use eventops_tests::{TestEnv, apply, env, eventually, unique, wait_ready};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::Api;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

const PARTITIONS: i32 = 3;
/// What SQS documents as its redrive ceiling, for the ratio printed.
const SQS_REDRIVE_PER_SECOND: f64 = 500.0;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(20_000), |a| a.parse())?;
    let env = env().await;
    let ns = env.namespace("bench-redrive").await;
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    let operator = env.start_operator_as(Some(&ns), Some(&user));
    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let orders = unique("bench.order-placed");
    apply(
        &topics,
        "orders",
        json!({"partitions": PARTITIONS, "topicName": orders}),
    )
    .await?;
    wait_ready(&topics, "orders", "True").await;
    let dlt = format!("{orders}.DLT");
    fill_dead_letters(&env, &orders, &dlt, n).await;

    // The copy loop, as the operator's user.
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &env.info.kafka_bootstrap)
        .set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanism", &env.info.kafka_sasl_mechanism)
        .set("sasl.username", &user.user)
        .set("sasl.password", &user.password);
    let (copy_took, copied) = copy_loop(&config, &dlt).await?;
    anyhow::ensure!(copied == n, "the copy loop moved {copied} of {n}");

    // The Redrive.
    let redrives: Api<Redrive> = Api::namespaced(env.client.clone(), &ns);
    let since = Instant::now();
    apply(&redrives, "all", json!({"source": "orders"})).await?;
    let (status, redrive_took) = eventually(
        Duration::from_secs(600),
        "the redrive Completed",
        || async {
            let status = redrives.get("all").await.ok()?.status?;
            (status.phase.as_deref() == Some("Completed")).then(|| (status, since.elapsed()))
        },
    )
    .await;
    operator.stop().await;
    anyhow::ensure!(
        status.moved == n as i64,
        "the Redrive moved {} of {n}",
        status.moved
    );
    let on_topic = topic_record_count(&env, &orders).await;
    anyhow::ensure!(
        on_topic >= 2 * n as i64,
        "{on_topic} records on {orders}, expected at least {}",
        2 * n
    );

    let rate = |took: Duration| n as f64 / took.as_secs_f64();
    let (eventops, copy) = (rate(redrive_took), rate(copy_took));
    println!("| contender | records | seconds | records/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| Redrive, default settings (exactly once, transactions of up to 10,000) | {n} | {:.2} | {eventops:.0} |",
        redrive_took.as_secs_f64()
    );
    println!(
        "| copy loop (idempotent producer, at least once) | {n} | {:.2} | {copy:.0} |",
        copy_took.as_secs_f64()
    );
    println!("| SQS redrive ceiling (published, not measured) | | | {SQS_REDRIVE_PER_SECOND:.0} |");
    println!(
        "bench-redrive: eventops {eventops:.0} records/s, copy loop {copy:.0} records/s, \
         eventops/copy {:.2}, eventops/sqs {:.1}",
        eventops / copy,
        eventops / SQS_REDRIVE_PER_SECOND
    );
    Ok(())
}

/// `n` dead letters of orders (≈130-byte values, 4 provenance headers as Spring and the
/// runtime write them), spread over the partitions; written as the super user (setup).
async fn fill_dead_letters(env: &TestEnv, orders: &str, dlt: &str, n: usize) {
    let p = producer(&env.info);
    let payload = event(
        "o-x",
        1,
        json!({"customer": "c-1", "total": 42.5, "items": 3}),
    );
    let mut sends = FuturesUnordered::new();
    for i in 0..n {
        let partition = (i % PARTITIONS as usize) as i32;
        let key = format!("o-{i}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "kafka_dlt-original-topic",
                value: Some(orders),
            })
            .insert(Header {
                key: "kafka_dlt-original-partition",
                value: Some(&partition.to_be_bytes()[..]),
            })
            .insert(Header {
                key: "kafka_dlt-original-offset",
                value: Some(&(i as i64).to_be_bytes()[..]),
            })
            .insert(Header {
                key: "kafka_dlt-exception-fqcn",
                value: Some("com.shop.PaymentDeclined"),
            });
        let record = FutureRecord::to(dlt)
            .partition(partition)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        sends.push(
            p.send_result(record)
                .map_err(|(e, _)| e)
                .expect("queueing a dead letter"),
        );
        if sends.len() >= 10_000 {
            let sent = sends.next().await.unwrap();
            sent.expect("delivered").expect("producing a dead letter");
        }
    }
    while let Some(sent) = sends.next().await {
        sent.expect("delivered").expect("producing a dead letter");
    }
    eventually(
        Duration::from_secs(60),
        &format!("{n} records in {dlt}"),
        || async { (topic_record_count(env, dlt).await == n as i64).then_some(()) },
    )
    .await;
}

/// Copies every record of `dlt` back to the topic and partition its headers name;
/// returns the time from the first read to the last acknowledgement, and the count.
async fn copy_loop(config: &ClientConfig, dlt: &str) -> anyhow::Result<(Duration, usize)> {
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", unique("bench-redrive-copy"))
        .set("enable.auto.commit", "false")
        .create()?;
    let producer: FutureProducer = config.clone().set("enable.idempotence", "true").create()?;
    let started = Instant::now();
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (_, high) = consumer.fetch_watermarks(dlt, p, Duration::from_secs(10))?;
        ends.insert(p, high);
        assignment.add_partition_offset(dlt, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut sends = FuturesUnordered::new();
    let mut copied = 0;
    let mut done = BTreeMap::new();
    while done.len() < PARTITIONS as usize {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = message?;
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition(), ());
        }
        let mut origin = None;
        let mut partition = None;
        let mut headers = OwnedHeaders::new();
        for h in m.headers().into_iter().flat_map(|hs| hs.iter()) {
            match h.key {
                "kafka_dlt-original-topic" => {
                    origin = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                }
                "kafka_dlt-original-partition" => {
                    partition = h
                        .value
                        .and_then(|v| v.try_into().ok())
                        .map(i32::from_be_bytes);
                }
                k if k.starts_with("kafka_dlt-") => {}
                k => {
                    headers = headers.insert(Header {
                        key: k,
                        value: h.value,
                    });
                }
            }
        }
        let from = format!("{dlt}/{}/{}", m.partition(), m.offset());
        headers = headers.insert(Header {
            key: "eventops-redriven-from",
            value: Some(&from),
        });
        let topic = origin.ok_or_else(|| anyhow::anyhow!("a dead letter without its origin"))?;
        let mut record = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(payload) = m.payload() {
            record = record.payload(payload);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        sends.push(producer.send_result(record).map_err(|(e, _)| e)?);
        copied += 1;
    }
    while let Some(sent) = sends.next().await {
        sent?.map_err(|(e, _)| e)?;
    }
    Ok((started.elapsed(), copied))
}
