//! The metrics registry (prometheus-client): the IIS-style service counters every actor updates,
//! and the per-actor metrics ([`ActorMeter`]): messages handled, handling time, work in flight,
//! live actors and restarts, labelled by actor kind. Served by the admin API at `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnlyLabel {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    pub check: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// An actor kind: `listener`, `session`, `queue`, `scheduler`, `local-drop`, `remote-delivery`,
/// `pickup`, or a route's actor (`maildir`, `lmtp`, a custom name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorLabel {
    pub actor: String,
}

/// The handling-time buckets' upper bounds: 50 µs to ~100 s (a session command takes
/// microseconds, a remote delivery seconds).
const HANDLING_START: f64 = 0.000_05;
const HANDLING_FACTOR: f64 = 4.0;
const HANDLING_BUCKETS: usize = 11;

/// Handling times of one actor kind: a Prometheus histogram (`mailroot_actor_handling_seconds`)
/// that the admin API can also read back (prometheus-client's own can only be encoded), and
/// whose observation is a few atomic additions instead of a lock.
#[derive(Clone, Debug, Default)]
pub struct HandlingTimes(Arc<Latency>);

#[derive(Debug, Default)]
struct Latency {
    /// Counts per bucket (upper bounds `HANDLING_START` × `HANDLING_FACTOR`^i), the last one past
    /// the largest bound.
    buckets: [AtomicU64; HANDLING_BUCKETS + 1],
    micros: AtomicU64,
}

impl prometheus_client::metrics::TypedMetric for HandlingTimes {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for HandlingTimes {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        let l = &self.0;
        let mut bound = HANDLING_START;
        let mut buckets = Vec::with_capacity(HANDLING_BUCKETS + 1);
        let mut count = 0;
        for (i, b) in l.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count += n;
            // The encoder adds the buckets up; the last is +Inf.
            buckets.push((if i < HANDLING_BUCKETS { bound } else { f64::MAX }, n));
            bound *= HANDLING_FACTOR;
        }
        let sum = l.micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<()>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        <Self as prometheus_client::metrics::TypedMetric>::TYPE
    }
}

impl HandlingTimes {
    fn observe(&self, seconds: f64) {
        let l = &self.0;
        let mut bound = HANDLING_START;
        let mut i = 0;
        while i < HANDLING_BUCKETS && seconds > bound {
            bound *= HANDLING_FACTOR;
            i += 1;
        }
        l.buckets[i].fetch_add(1, Ordering::Relaxed);
        l.micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// (mean, the bound under which at least 99% of the times fall) in seconds; `None` when
    /// nothing was measured, and a p99 of `None` when it lies past the largest bound.
    fn summary(&self) -> Option<(f64, Option<f64>)> {
        let counts: Vec<u64> = self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let n: u64 = counts.iter().sum();
        if n == 0 {
            return None;
        }
        let mean = self.0.micros.load(Ordering::Relaxed) as f64 / 1e6 / n as f64;
        let wanted = n - n / 100;
        let (mut seen, mut bound) = (0, HANDLING_START);
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= wanted {
                return Some((mean, (i < HANDLING_BUCKETS).then_some(bound)));
            }
            bound *= HANDLING_FACTOR;
        }
        Some((mean, None))
    }
}

/// One actor kind in the admin API's `/api/actors`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ActorRow {
    pub actor: String,
    pub live: i64,
    pub handled: u64,
    pub in_flight: i64,
    pub restarts: u64,
    /// Mean handling time in seconds (`None`: nothing handled yet).
    pub mean_seconds: Option<f64>,
    /// 99% of messages were handled within this (a bucket bound: an upper estimate); `None`
    /// with messages handled means longer than ~100 s.
    pub p99_seconds: Option<f64>,
}

/// The per-actor metric families.
pub struct ActorMetrics {
    pub handled: Family<ActorLabel, Counter>,
    pub handling_seconds: Family<ActorLabel, HandlingTimes>,
    pub in_flight: Family<ActorLabel, Gauge>,
    pub live: Family<ActorLabel, Gauge>,
    pub restarts: Family<ActorLabel, Counter>,
    /// Every kind that asked for a meter (a family cannot be walked).
    kinds: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// One actor kind's handles on the per-actor metrics, resolved once so that measuring a message
/// costs a few atomic operations and no map lookup.
#[derive(Clone)]
pub struct ActorMeter {
    handled: Counter,
    seconds: HandlingTimes,
    in_flight: Gauge,
    live: Gauge,
    restarts: Counter,
}

impl ActorMeter {
    /// Starts measuring one message; the measurement ends when the guard is dropped.
    pub fn handling(&self) -> Handling {
        self.in_flight.inc();
        Handling { meter: self.clone(), start: std::time::Instant::now() }
    }

    /// An actor of this kind started (call from `Actor::started`).
    pub fn started(&self) {
        self.live.inc();
    }

    /// An actor of this kind stopped (call from `Actor::stopped`).
    pub fn stopped(&self) {
        self.live.dec();
    }

    pub fn restarted(&self) {
        self.restarts.inc();
    }
}

/// Measures one message from [`ActorMeter::handling`] until dropped (move it into the
/// response future of an asynchronous handler).
pub struct Handling {
    meter: ActorMeter,
    start: std::time::Instant,
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.meter.in_flight.dec();
        self.meter.handled.inc();
        self.meter.seconds.observe(self.start.elapsed().as_secs_f64());
    }
}

pub struct Metrics {
    pub actors: ActorMetrics,
    /// The last hour minute by minute (not Prometheus: served by `/api/history`).
    pub history: crate::history::History,
    /// Messages accepted into the queue, by source (`smtp`, `pickup`).
    pub messages_received: Family<SourceLabel, Counter>,
    /// Bytes of accepted messages, trace header included.
    pub bytes_received: Counter,
    /// Per-recipient delivery results, by route (`drop`, …) and result.
    pub deliveries: Family<RouteLabel, Counter>,
    /// Bytes of messages handed on by delivery actors (once per delivery that delivered at
    /// least one recipient), by route.
    pub bytes_delivered: Family<RouteOnlyLabel, Counter>,
    pub connections_total: Counter,
    pub connections_current: Gauge,
    /// The same per listener (by its name in the configuration).
    pub listener_connections: Family<ListenerLabel, Counter>,
    pub listener_connections_current: Family<ListenerLabel, Gauge>,
    /// Refused connections, commands and messages, by cause.
    pub refusals: Family<CauseLabel, Counter>,
    /// Pickup files taken (`queued`) or moved to Badmail (`badmail`).
    pub pickup_files: Family<ResultLabel, Counter>,
    /// Messages in the queue store.
    pub queue_messages: Gauge,
    /// Bytes of message bodies being received that sessions hold in memory (the body budget).
    pub body_memory: Gauge,
    /// Messages in the queue by state (`active`, `ready`, `deferred`, `held`); set when scraped.
    pub queue_by_state: Family<StateLabel, Gauge>,
    /// How many waiters each queue sync served (group commit).
    pub queue_commit_batch: Histogram,
    /// How many files each Drop directory sync covered.
    pub drop_commit_batch: Histogram,
    /// Notifications generated, by kind (`failure`, `delay`, `success`).
    pub notifications: Family<KindLabel, Counter>,
    /// Messages written to Badmail by the queue, by cause.
    pub badmail: Family<CauseLabel, Counter>,
    /// Delivery attempts that were retries (attempt number 2 or later), per recipient.
    pub retries: Counter,
    /// Recipients checked at RCPT with the LMTP server, by result (`exists`, `unknown`,
    /// `unverified`).
    pub recipient_checks: Family<ResultLabel, Counter>,
    /// Messages the DKIM signer looked at, by result (`signed`, `no_key`, `already_signed`,
    /// `header_too_large`, `failed`).
    pub dkim: Family<ResultLabel, Counter>,
    /// Outbound connections under a TLS policy that demands TLS, by policy and result
    /// (`success`, `failure`): the counts a TLS-RPT report needs.
    pub tls_policy: Family<PolicyLabel, Counter>,
    /// Times a destination answered that it limits our rate, and was paused.
    pub rate_limited: Counter,
    /// Per-domain TLS session counts for SMTP TLS reports (not Prometheus: domains are many).
    pub tls_rpt: crate::tlsrpt::Counts,
    /// Times the queue store could not write (a full or failing disk) and mail was refused.
    pub store_failures: Counter,
    /// Times the failed queue store was reopened and took mail again, without a restart.
    pub store_reopens: Counter,
    /// Messages this node took over from another node whose lease had expired (shared store):
    /// each may be delivered twice, if the other node had handed it over without recording it.
    pub queue_takeovers: Counter,
    /// Outbound SMTP connections opened, and open now.
    pub outbound_connections: Counter,
    pub outbound_connections_current: Gauge,
    /// Outbound connection attempts that failed (refused, timed out, unreachable).
    pub outbound_connect_failures: Counter,
    /// Outbound connections that negotiated TLS.
    pub outbound_tls: Counter,
    /// DNS lookups made for delivery, by result (`ok`, `nxdomain`, `nodata`, `error`).
    pub dns_queries: Family<ResultLabel, Counter>,
    /// AUTH attempts, by result (`success`, `failure`).
    pub auth: Family<ResultLabel, Counter>,
    /// Inbound connections upgraded with STARTTLS.
    pub inbound_tls: Counter,
    /// Results of the checks of who inbound mail is from, by check (`spf`, `dkim`, `arc`,
    /// `dmarc`, `all` for timeouts) and result.
    pub inbound_auth: Family<CheckLabel, Counter>,
}

/// A `&'static str` for a route or actor name from the configuration (metric labels want one).
/// Names are few and fixed by the configuration, so the set stays small.
pub fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0].into_iter())
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            history: Default::default(),
            actors: ActorMetrics {
                handled: Family::default(),
                handling_seconds: Family::default(),
                in_flight: Family::default(),
                live: Family::default(),
                restarts: Family::default(),
                kinds: Default::default(),
            },
            messages_received: Family::default(),
            bytes_received: Counter::default(),
            deliveries: Family::default(),
            bytes_delivered: Family::default(),
            connections_total: Counter::default(),
            connections_current: Gauge::default(),
            listener_connections: Family::default(),
            listener_connections_current: Family::default(),
            refusals: Family::default(),
            pickup_files: Family::default(),
            queue_messages: Gauge::default(),
            body_memory: Gauge::default(),
            queue_by_state: Family::default(),
            queue_commit_batch: batch_histogram(),
            drop_commit_batch: batch_histogram(),
            notifications: Family::default(),
            badmail: Family::default(),
            retries: Counter::default(),
            store_failures: Counter::default(),
            recipient_checks: Family::default(),
            dkim: Family::default(),
            tls_policy: Family::default(),
            rate_limited: Counter::default(),
            tls_rpt: Default::default(),
            store_reopens: Counter::default(),
            queue_takeovers: Counter::default(),
            outbound_connections: Counter::default(),
            outbound_connections_current: Gauge::default(),
            outbound_connect_failures: Counter::default(),
            outbound_tls: Counter::default(),
            dns_queries: Family::default(),
            auth: Family::default(),
            inbound_tls: Counter::default(),
            inbound_auth: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("mailroot");
        r.register("messages_received", "Messages accepted into the queue", m.messages_received.clone());
        r.register("bytes_received", "Bytes of accepted messages", m.bytes_received.clone());
        r.register("deliveries", "Per-recipient delivery results", m.deliveries.clone());
        r.register("bytes_delivered", "Bytes of messages delivered, by route", m.bytes_delivered.clone());
        r.register("inbound_connections", "SMTP connections accepted", m.connections_total.clone());
        r.register("inbound_connections_current", "SMTP connections open now", m.connections_current.clone());
        r.register("listener_connections", "SMTP connections accepted, by listener", m.listener_connections.clone());
        r.register(
            "listener_connections_current",
            "SMTP connections open now, by listener",
            m.listener_connections_current.clone(),
        );
        r.register("inbound_auth", "SPF, DKIM, ARC and DMARC results of inbound mail", m.inbound_auth.clone());
        r.register("refusals", "Refused connections, commands and messages by cause", m.refusals.clone());
        r.register("pickup_files", "Pickup files taken or moved to Badmail", m.pickup_files.clone());
        r.register("queue_messages", "Messages in the queue", m.queue_messages.clone());
        r.register(
            "body_memory_bytes",
            "Bytes of message bodies being received held in memory ([limits] max_body_memory)",
            m.body_memory.clone(),
        );
        r.register("queue_messages_by_state", "Messages in the queue by state", m.queue_by_state.clone());
        r.register("queue_commit_batch_size", "Messages made durable per queue sync", m.queue_commit_batch.clone());
        r.register("drop_commit_batch_size", "Drop files made durable per directory sync", m.drop_commit_batch.clone());
        r.register("notifications", "Delivery status notifications generated", m.notifications.clone());
        r.register("badmail", "Messages the queue wrote to Badmail", m.badmail.clone());
        r.register("delivery_retries", "Per-recipient delivery attempts after the first", m.retries.clone());
        r.register(
            "outbound_tls_policy",
            "Outbound connections under a TLS policy that demands TLS, by policy and result",
            m.tls_policy.clone(),
        );
        r.register(
            "outbound_rate_limited",
            "Times a destination said it limits our rate and was paused",
            m.rate_limited.clone(),
        );
        r.register("dkim_signing", "Messages the DKIM signer looked at, by result", m.dkim.clone());
        r.register(
            "recipient_checks",
            "Recipients checked at RCPT with the LMTP server, by result",
            m.recipient_checks.clone(),
        );
        r.register(
            "queue_store_failures",
            "Times the queue store could not write and mail was refused",
            m.store_failures.clone(),
        );
        r.register(
            "queue_store_reopens",
            "Times the failed queue store was reopened without a restart",
            m.store_reopens.clone(),
        );
        r.register(
            "queue_takeovers",
            "Messages taken over from a node whose lease had expired (possible duplicates)",
            m.queue_takeovers.clone(),
        );
        r.register("outbound_connections", "Outbound SMTP connections opened", m.outbound_connections.clone());
        r.register(
            "outbound_connections_current",
            "Outbound SMTP connections open now",
            m.outbound_connections_current.clone(),
        );
        r.register(
            "outbound_connect_failures",
            "Outbound connection attempts that failed",
            m.outbound_connect_failures.clone(),
        );
        r.register("outbound_tls", "Outbound connections that negotiated TLS", m.outbound_tls.clone());
        r.register("dns_queries", "DNS lookups made for delivery", m.dns_queries.clone());
        r.register("auth", "SMTP AUTH attempts by result", m.auth.clone());
        r.register("inbound_tls", "Inbound connections upgraded with STARTTLS", m.inbound_tls.clone());
        let a = registry.sub_registry_with_prefix("mailroot_actor");
        a.register("messages_handled", "Messages handled, by actor kind", m.actors.handled.clone());
        a.register(
            "handling_seconds",
            "Time from taking a message to answering it, by actor kind",
            m.actors.handling_seconds.clone(),
        );
        a.register("in_flight", "Messages being handled now, by actor kind", m.actors.in_flight.clone());
        a.register("live", "Actors alive now, by actor kind", m.actors.live.clone());
        a.register("restarts", "Actors restarted by their supervisor after a panic", m.actors.restarts.clone());
        Arc::new(m)
    }

    /// The meter of one actor kind.
    pub fn actor(&self, kind: &str) -> ActorMeter {
        let label = ActorLabel { actor: kind.to_string() };
        let a = &self.actors;
        a.kinds.lock().unwrap_or_else(|e| e.into_inner()).insert(kind.to_string());
        ActorMeter {
            handled: a.handled.get_or_create(&label).clone(),
            seconds: a.handling_seconds.get_or_create(&label).clone(),
            in_flight: a.in_flight.get_or_create(&label).clone(),
            live: a.live.get_or_create(&label).clone(),
            restarts: a.restarts.get_or_create(&label).clone(),
        }
    }

    /// Every actor kind with its counts and handling times, by name.
    pub fn actor_table(&self) -> Vec<ActorRow> {
        let kinds: Vec<String> = self.actors.kinds.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        let a = &self.actors;
        kinds
            .into_iter()
            .map(|actor| {
                let label = ActorLabel { actor };
                let summary = a.handling_seconds.get_or_create(&label).summary();
                ActorRow {
                    live: a.live.get_or_create(&label).get(),
                    handled: a.handled.get_or_create(&label).get(),
                    in_flight: a.in_flight.get_or_create(&label).get(),
                    restarts: a.restarts.get_or_create(&label).get(),
                    mean_seconds: summary.map(|s| s.0),
                    p99_seconds: summary.and_then(|s| s.1),
                    actor: label.actor,
                }
            })
            .collect()
    }

    /// A registry-less instance for tests and embedding without metrics.
    pub fn unregistered() -> Arc<Self> {
        Self::new(&mut Registry::default())
    }

    pub fn refused(&self, cause: &'static str) {
        self.refusals.get_or_create(&CauseLabel { cause }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean and p99 as `/api/actors` shows them, from known handling times.
    #[test]
    fn handling_time_summaries() {
        // (handling times and how often each, the expected (mean, p99)).
        type Case<'a> = (&'a [(f64, usize)], Option<(f64, Option<f64>)>);
        let cases: [Case; 4] = [
            (&[], None),
            // 100 × 1 ms: mean 1 ms; p99 in the bucket up to 3.2 ms (50 µs × 4³).
            (&[(0.001, 100)], Some((0.001, Some(0.0032)))),
            // 99 fast, one slow: p99 still the fast bucket (at least 99% within it).
            (&[(0.000_01, 99), (2.0, 1)], Some((0.020_009_9, Some(0.000_05)))),
            // Past the largest bound (~52 s): no p99 bound.
            (&[(500.0, 10)], Some((500.0, None))),
        ];
        for (times, want) in cases {
            let l = HandlingTimes::default();
            for &(t, n) in times {
                for _ in 0..n {
                    l.observe(t);
                }
            }
            match (l.summary(), want) {
                (None, None) => {}
                (Some((mean, p99)), Some((wmean, wp99))) => {
                    assert!((mean - wmean).abs() < 1e-5, "{times:?}: mean {mean} vs {wmean}");
                    match (p99, wp99) {
                        (None, None) => {}
                        (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{times:?}: p99 {a} vs {b}"),
                        other => panic!("{times:?}: p99 {other:?}"),
                    }
                }
                other => panic!("{times:?}: {other:?}"),
            }
        }
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let meter = m.actor("queue");
        meter.started();
        drop(meter.handling());
        let table = m.actor_table();
        let q = table.iter().find(|r| r.actor == "queue").unwrap();
        assert_eq!((q.live, q.handled, q.in_flight), (1, 1, 0));
        assert!(q.mean_seconds.is_some());
        // The same observations, as Prometheus reads them: a histogram with cumulative buckets
        // (one more of a known time: the first took however long the machine let it).
        m.actors.handling_seconds.get_or_create(&ActorLabel { actor: "queue".into() }).observe(0.001);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line =
            |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} in {text}"));
        assert!(text.contains("# TYPE mailroot_actor_handling_seconds histogram"), "{text}");
        let value = |prefix: &str| line(prefix).rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(-1.0);
        assert_eq!(value("mailroot_actor_handling_seconds_count{actor=\"queue\"}"), 2.0);
        assert_eq!(value("mailroot_actor_handling_seconds_bucket{le=\"+Inf\",actor=\"queue\"}"), 2.0);
        assert!(value("mailroot_actor_handling_seconds_bucket{le=\"0.0032\",actor=\"queue\"}") >= 1.0, "cumulative");
        assert!(value("mailroot_actor_handling_seconds_sum{actor=\"queue\"}") >= 0.001);
    }
}
