//! Sending SMTP TLS reports (RFC 8460): once a day, yesterday's counts (`mailroot_actors::tlsrpt`)
//! go to the `mailto:` addresses each reported domain publishes at `_smtp._tls.<domain>`, as mail
//! queued like any other (DKIM-signed when the host name's domain has a key, null sender so a
//! failure never bounces). `POST /api/tls-report/send` does the same at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use hickory_proto::rr::{RData, RecordType};
use mailroot_actors::clock::unix_now;
use mailroot_actors::metrics::Metrics;
use mailroot_actors::protocol::address::parse_mailbox;
use mailroot_actors::protocol::received::Origin;
use mailroot_actors::queue::Enqueue;
use mailroot_actors::remote::dane::secure_query;
use mailroot_actors::supervisor::QueueSupervisor;
use mailroot_actors::tlsrpt;
use tracing::{info, warn};

pub struct TlsReporter {
    pub metrics: Arc<Metrics>,
    pub queue: Addr<QueueSupervisor>,
    pub hostname: String,
    /// Where `_smtp._tls` records are looked up: `delivery.nameservers`, or the system's.
    pub nameservers: Vec<SocketAddr>,
}

impl TlsReporter {
    /// Queues the report of yesterday (or today so far) for every domain that asks for one;
    /// returns how many were queued.
    pub async fn send(&self, yesterday: bool) -> Result<usize, String> {
        let now = unix_now();
        let mut queued = 0;
        for (domain, report) in self.metrics.tls_rpt.report(&self.hostname, yesterday, now).per_domain() {
            let records = match secure_query(&self.nameservers, &format!("_smtp._tls.{domain}"), RecordType::TXT).await
            {
                Ok((_, answer)) => answer
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(t) => Some(
                            String::from_utf8_lossy(
                                &t.txt_data.iter().flat_map(|s| s.iter().copied()).collect::<Vec<u8>>(),
                            )
                            .into_owned(),
                        ),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                Err(e) => {
                    warn!(domain, error = %e, "cannot look up where TLS reports go");
                    continue;
                }
            };
            let to = tlsrpt::mailto_rua(&records);
            let recipients: Vec<_> = to.iter().filter_map(|a| parse_mailbox(a).ok()).collect();
            if recipients.is_empty() {
                continue;
            }
            let body = tlsrpt::message(&report, &domain, &self.hostname, &to, now);
            let req = Enqueue {
                sender: None,
                recipients,
                dsn: Default::default(),
                rcpt_dsn: Vec::new(),
                body,
                origin: Origin::Local,
                origin_text: format!("TLS report for {domain}"),
                pickup: None,
                staged: None,
                sign: true,
                auth_results: String::new(),
            };
            match self.queue.send(req).await {
                Ok(Ok(id)) => {
                    info!(id, domain, to = %to.join(","), "TLS report queued");
                    queued += 1;
                }
                Ok(Err(e)) => return Err(format!("the queue refused the report for {domain}: {e:?}")),
                Err(e) => return Err(format!("the queue is not answering: {e}")),
            }
        }
        Ok(queued)
    }

    /// Sends yesterday's reports shortly after each UTC midnight, until the system stops.
    pub fn schedule(self: Arc<Self>) {
        actix::spawn(async move {
            loop {
                let now = unix_now();
                // Ten minutes into the day, so the last sessions of yesterday are counted.
                let next = (now / 86_400 + 1) * 86_400 + 600;
                tokio::time::sleep(Duration::from_secs(next.saturating_sub(now))).await;
                if let Err(e) = self.send(true).await {
                    warn!(error = %e, "TLS reports not sent");
                }
            }
        });
    }
}
