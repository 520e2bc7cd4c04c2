//! NATS JetStream on its own, for bench/cluster.py: publish → consume latency and throughput on
//! the servers the cluster benchmark runs, with the payload size of the supervisor's envelopes and
//! a stream configured as `RINGRIFT_EVENTS` is (file storage, the replicas given, a 120 s duplicate
//! window, each message with a `Nats-Msg-Id`). Not part of the supervisor: an example, built with
//! `cargo build --release --example natsbench`.
//!
//! Two consumers are measured, each a durable pull consumer with explicit acks on its own
//! connection:
//! - `stream`: the client's continuous pull (`messages()`), each message acked (`ack`);
//! - `fetch`: the supervisor's inbox pattern (supervisor/cluster/bus.rs): fetches of up to 64
//!   expiring after 1 s, each message acknowledged with `double_ack`.
//!
//! For each: latency of single messages (publish start → the consumer has it, both in this
//! process, one monotonic clock), then throughput of a burst published one at a time (each publish
//! waits for its ack, as the supervisor's outbox does) and of a burst with many publishes in
//! flight. Prints one JSON object on stdout.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Server URL(s) of the publishing connection (comma-separated)
    #[arg(long)]
    publish: String,
    /// Server URL(s) of the consuming connection (comma-separated)
    #[arg(long)]
    consume: String,
    /// Replicas of the stream
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Payload size in bytes
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Latency samples per consumer
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Gap between latency samples, in milliseconds
    #[arg(long, default_value_t = 10)]
    gap_ms: u64,
    /// Messages per throughput burst
    #[arg(long, default_value_t = 5000)]
    burst: usize,
    /// Publishes in flight in the pipelined burst
    #[arg(long, default_value_t = 256)]
    inflight: usize,
}

const STREAM: &str = "NATSBENCH";
const TIMEOUT: Duration = Duration::from_millis(2000);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Stream,
    Fetch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Fetch => "fetch",
        }
    }
}

async fn connect(urls: &str) -> anyhow::Result<jetstream::Context> {
    let servers: Vec<String> = urls.split(',').map(str::to_string).collect();
    let client = async_nats::ConnectOptions::new()
        .name("natsbench")
        .retain_servers_order()
        .request_timeout(Some(TIMEOUT))
        .connect(servers)
        .await?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(TIMEOUT)
        .build(client))
}

/// The payload: the message's number and its send time (ns since `base`), padded to `size`.
fn payload(i: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{i} {sent_ns} ").into_bytes();
    p.resize(size.max(p.len()), b'x');
    p
}

fn parse(p: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(p.get(..p.len().min(48))?).ok()?;
    let mut it = s.split(' ');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Starts a consumer on its own connection; every message received goes to the channel as
/// (number, send time ns, receive time ns).
async fn consumer_task(
    js: jetstream::Context,
    mode: Mode,
    name: String,
    base: Instant,
) -> anyhow::Result<mpsc::UnboundedReceiver<(u64, u64, u64)>> {
    let stream = js.get_stream(STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(5),
                filter_subject: "natsbench.>".into(),
                ..Default::default()
            },
        )
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        match mode {
            Mode::Stream => {
                let Ok(mut messages) = consumer.messages().await else {
                    return;
                };
                while let Some(Ok(msg)) = messages.next().await {
                    let now = base.elapsed().as_nanos() as u64;
                    if let Some((i, sent)) = parse(&msg.payload)
                        && tx.send((i, sent, now)).is_err()
                    {
                        return;
                    }
                    let _ = msg.ack().await;
                }
            }
            Mode::Fetch => loop {
                let Ok(mut batch) = consumer
                    .fetch()
                    .max_messages(64)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                else {
                    return;
                };
                while let Some(Ok(msg)) = batch.next().await {
                    let now = base.elapsed().as_nanos() as u64;
                    if let Some((i, sent)) = parse(&msg.payload)
                        && tx.send((i, sent, now)).is_err()
                    {
                        return;
                    }
                    let _ = msg.double_ack().await;
                }
            },
        }
    });
    Ok(rx)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

async fn publish(
    js: &jetstream::Context,
    i: u64,
    base: Instant,
    size: usize,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("natsbench-{i}").as_str());
    let body = payload(i, base.elapsed().as_nanos() as u64, size);
    Ok(js
        .publish_with_headers("natsbench.NEW_GAMES_AVAILABLE", headers, body.into())
        .await?)
}

/// Waits until message `last` arrived; returns the receive time (ns since base) of the last one
/// and how many of `first..=last` arrived.
async fn drain(
    rx: &mut mpsc::UnboundedReceiver<(u64, u64, u64)>,
    first: u64,
    last: u64,
) -> anyhow::Result<(u64, usize)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut latest = 0;
    while seen.len() < (last - first + 1) as usize {
        let (i, _, now) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "messages stopped coming ({} of {})",
                    seen.len(),
                    last - first + 1
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("the consumer stopped"))?;
        if (first..=last).contains(&i) {
            seen.insert(i);
            latest = latest.max(now);
        }
    }
    Ok((latest, seen.len()))
}

async fn run_mode(
    args: &Args,
    pubjs: &jetstream::Context,
    subjs: &jetstream::Context,
    mode: Mode,
    next: &mut u64,
    base: Instant,
) -> anyhow::Result<serde_json::Value> {
    let mut rx = consumer_task(subjs.clone(), mode, format!("bench-{}", mode.name()), base).await?;
    // Warm-up: a few messages through, not counted.
    let warm = *next;
    for _ in 0..20 {
        publish(pubjs, *next, base, args.size).await?.await?;
        *next += 1;
    }
    drain(&mut rx, warm, *next - 1).await?;

    // Latency: single messages, each published (ack awaited) and received before the next.
    let mut lat = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let i = *next;
        *next += 1;
        publish(pubjs, i, base, args.size).await?.await?;
        loop {
            let (j, sent, now) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the consumer stopped"))?;
            if j == i {
                lat.push(ms(now - sent));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    lat.sort_by(f64::total_cmp);

    // Throughput, one publish at a time (each waits for its ack, as the supervisor's outbox).
    let first = *next;
    let start = base.elapsed().as_nanos() as u64;
    for _ in 0..args.burst {
        publish(pubjs, *next, base, args.size).await?.await?;
        *next += 1;
    }
    let published = base.elapsed().as_nanos() as u64;
    let (last_recv, got_sync) = drain(&mut rx, first, *next - 1).await?;
    let sync_secs = (last_recv - start) as f64 / 1e9;
    let sync_pub_secs = (published - start) as f64 / 1e9;

    // Throughput, with up to `inflight` publishes awaiting their acks.
    let first = *next;
    let start = base.elapsed().as_nanos() as u64;
    let mut pending = VecDeque::with_capacity(args.inflight);
    for _ in 0..args.burst {
        if pending.len() >= args.inflight {
            let ack: jetstream::context::PublishAckFuture =
                pending.pop_front().expect("one pending");
            ack.await?;
        }
        pending.push_back(publish(pubjs, *next, base, args.size).await?);
        *next += 1;
    }
    for ack in pending {
        ack.await?;
    }
    let published = base.elapsed().as_nanos() as u64;
    let (last_recv, got_pipe) = drain(&mut rx, first, *next - 1).await?;
    let pipe_secs = (last_recv - start) as f64 / 1e9;
    let pipe_pub_secs = (published - start) as f64 / 1e9;
    drop(rx);
    let _ = subjs
        .get_stream(STREAM)
        .await?
        .delete_consumer(&format!("bench-{}", mode.name()))
        .await;

    Ok(json!({
        "consumer": mode.name(),
        "latency_ms_p50": percentile(&lat, 50.0),
        "latency_ms_p99": percentile(&lat, 99.0),
        "latency_ms_max": percentile(&lat, 100.0),
        "latency_samples": lat.len(),
        "sync": {
            "messages": args.burst,
            "received": got_sync,
            "seconds": sync_secs,
            "publish_seconds": sync_pub_secs,
            "per_second": args.burst as f64 / sync_secs,
        },
        "pipelined": {
            "messages": args.burst,
            "received": got_pipe,
            "inflight": args.inflight,
            "seconds": pipe_secs,
            "publish_seconds": pipe_pub_secs,
            "per_second": args.burst as f64 / pipe_secs,
        },
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pubjs = connect(&args.publish).await?;
    let subjs = connect(&args.consume).await?;
    let _ = pubjs.delete_stream(STREAM).await;
    pubjs
        .get_or_create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["natsbench.>".into()],
            max_age: Duration::from_secs(3600),
            storage: stream::StorageType::File,
            num_replicas: args.replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    let base = Instant::now();
    let mut next = 1;
    let mut results = Vec::new();
    for mode in [Mode::Stream, Mode::Fetch] {
        results.push(run_mode(&args, &pubjs, &subjs, mode, &mut next, base).await?);
    }
    let _ = pubjs.delete_stream(STREAM).await;
    println!(
        "{}",
        json!({
            "replicas": args.replicas,
            "payload_bytes": args.size,
            "consumers": results,
        })
    );
    Ok(())
}
