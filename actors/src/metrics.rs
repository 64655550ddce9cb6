//! The metrics registry (prometheus-client): counters every actor updates. Exposed by the admin
//! API in a later change; tests and benchmarks read them directly.

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
pub struct CauseLabel {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

pub struct Metrics {
    /// Messages accepted into the queue, by source (`smtp`, `pickup`).
    pub messages_received: Family<SourceLabel, Counter>,
    /// Bytes of accepted messages, trace header included.
    pub bytes_received: Counter,
    /// Per-recipient delivery results, by route (`drop`, …) and result.
    pub deliveries: Family<RouteLabel, Counter>,
    pub connections_total: Counter,
    pub connections_current: Gauge,
    /// Refused connections, commands and messages, by cause.
    pub refusals: Family<CauseLabel, Counter>,
    /// Pickup files taken (`queued`) or moved to Badmail (`badmail`).
    pub pickup_files: Family<ResultLabel, Counter>,
    /// Messages in the queue store.
    pub queue_messages: Gauge,
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
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0].into_iter())
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            messages_received: Family::default(),
            bytes_received: Counter::default(),
            deliveries: Family::default(),
            connections_total: Counter::default(),
            connections_current: Gauge::default(),
            refusals: Family::default(),
            pickup_files: Family::default(),
            queue_messages: Gauge::default(),
            queue_commit_batch: batch_histogram(),
            drop_commit_batch: batch_histogram(),
            notifications: Family::default(),
            badmail: Family::default(),
            retries: Counter::default(),
            outbound_connections: Counter::default(),
            outbound_connections_current: Gauge::default(),
            outbound_connect_failures: Counter::default(),
            outbound_tls: Counter::default(),
            dns_queries: Family::default(),
            auth: Family::default(),
            inbound_tls: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("mailroot");
        r.register("messages_received", "Messages accepted into the queue", m.messages_received.clone());
        r.register("bytes_received", "Bytes of accepted messages", m.bytes_received.clone());
        r.register("deliveries", "Per-recipient delivery results", m.deliveries.clone());
        r.register("inbound_connections", "SMTP connections accepted", m.connections_total.clone());
        r.register("inbound_connections_current", "SMTP connections open now", m.connections_current.clone());
        r.register("refusals", "Refused connections, commands and messages by cause", m.refusals.clone());
        r.register("pickup_files", "Pickup files taken or moved to Badmail", m.pickup_files.clone());
        r.register("queue_messages", "Messages in the queue", m.queue_messages.clone());
        r.register("queue_commit_batch_size", "Messages made durable per queue sync", m.queue_commit_batch.clone());
        r.register("drop_commit_batch_size", "Drop files made durable per directory sync", m.drop_commit_batch.clone());
        r.register("notifications", "Delivery status notifications generated", m.notifications.clone());
        r.register("badmail", "Messages the queue wrote to Badmail", m.badmail.clone());
        r.register("delivery_retries", "Per-recipient delivery attempts after the first", m.retries.clone());
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
        Arc::new(m)
    }

    /// A registry-less instance for tests and embedding without metrics.
    pub fn unregistered() -> Arc<Self> {
        Self::new(&mut Registry::default())
    }

    pub fn refused(&self, cause: &'static str) {
        self.refusals.get_or_create(&CauseLabel { cause }).inc();
    }
}
