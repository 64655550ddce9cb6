//! The counts an SMTP TLS report (RFC 8460) is made of: per recipient domain and policy type
//! (`tlsa`, `sts`, `no-policy-found`), the TLS sessions that succeeded and those that failed,
//! by result type and MX host, for today and yesterday (UTC days). `GET /api/tls-report` shows
//! them in the report's own JSON shape; [`message`] makes the mail that carries one domain's
//! report to the `mailto:` addresses of its `_smtp._tls` record (the daemon sends yesterday's
//! once a day).
//!
//! Memory is bounded: at most [`MAX_DOMAINS`] domains a day and [`MAX_DETAILS`] failure rows a
//! domain; what does not fit is counted in the summary only.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

pub const MAX_DOMAINS: usize = 10_000;
pub const MAX_DETAILS: usize = 32;

#[derive(Default, Clone)]
struct Entry {
    successes: u64,
    failures: u64,
    /// (result type, receiving MX host, receiving IP) → sessions.
    details: HashMap<(&'static str, String, String), u64>,
}

#[derive(Default)]
struct Day {
    day: u64,
    entries: HashMap<(String, &'static str), Entry>,
}

/// Today's and yesterday's counts.
#[derive(Default)]
pub struct Counts {
    days: Mutex<(Day, Day)>,
}

/// One session's result, for [`Counts::record`].
pub enum Session<'a> {
    Success,
    /// RFC 8460 §4.3 result type (`starttls-not-supported`, `certificate-not-trusted`, …).
    Failure {
        result_type: &'static str,
        mx: &'a str,
        ip: String,
    },
}

impl Counts {
    pub fn record(&self, domain: &str, policy_type: &'static str, session: Session<'_>, now: u64) {
        let mut days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        let today = now / 86_400;
        if days.0.day != today {
            let old = std::mem::take(&mut days.0);
            days.1 = if old.day + 1 == today { old } else { Day::default() };
            days.0.day = today;
        }
        let key = (domain.to_ascii_lowercase(), policy_type);
        if days.0.entries.len() >= MAX_DOMAINS && !days.0.entries.contains_key(&key) {
            return;
        }
        let e = days.0.entries.entry(key).or_default();
        match session {
            Session::Success => e.successes += 1,
            Session::Failure { result_type, mx, ip } => {
                e.failures += 1;
                let k = (result_type, mx.to_string(), ip);
                if e.details.len() < MAX_DETAILS || e.details.contains_key(&k) {
                    *e.details.entry(k).or_default() += 1;
                }
            }
        }
    }

    /// The report of `yesterday` (the last complete day) or today so far, RFC 8460 §4 shaped.
    pub fn report(&self, organization: &str, yesterday: bool, now: u64) -> Report {
        let days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        let want = now / 86_400 - u64::from(yesterday);
        let day = [&days.0, &days.1].into_iter().find(|d| d.day == want && !d.entries.is_empty());
        let start = want * 86_400;
        let mut policies: Vec<PolicyReport> = day
            .map(|d| {
                d.entries
                    .iter()
                    .map(|((domain, policy_type), e)| PolicyReport {
                        policy: Policy { policy_type, policy_domain: domain.clone() },
                        summary: Summary {
                            total_successful_session_count: e.successes,
                            total_failure_session_count: e.failures,
                        },
                        failure_details: e
                            .details
                            .iter()
                            .map(|((result_type, mx, ip), n)| FailureDetail {
                                result_type,
                                receiving_mx_hostname: mx.clone(),
                                receiving_ip: ip.clone(),
                                failed_session_count: *n,
                            })
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        policies.sort_by(|a, b| {
            (&a.policy.policy_domain, a.policy.policy_type).cmp(&(&b.policy.policy_domain, b.policy.policy_type))
        });
        Report {
            organization_name: organization.to_string(),
            date_range: DateRange {
                start_datetime: crate::protocol::received::rfc3339_utc(start),
                end_datetime: crate::protocol::received::rfc3339_utc(start + 86_399),
            },
            contact_info: format!("postmaster@{organization}"),
            report_id: format!("{}.{}@{organization}", crate::protocol::received::rfc3339_utc(start), want),
            policies,
        }
    }
}

impl Report {
    /// One report per policy domain (RFC 8460 §4: a report is about one domain's policies).
    pub fn per_domain(self) -> Vec<(String, Report)> {
        let mut by: std::collections::BTreeMap<String, Vec<PolicyReport>> = Default::default();
        for p in self.policies {
            by.entry(p.policy.policy_domain.clone()).or_default().push(p);
        }
        by.into_iter()
            .map(|(domain, policies)| {
                let report = Report {
                    organization_name: self.organization_name.clone(),
                    date_range: DateRange {
                        start_datetime: self.date_range.start_datetime.clone(),
                        end_datetime: self.date_range.end_datetime.clone(),
                    },
                    contact_info: self.contact_info.clone(),
                    report_id: format!("{}.{domain}", self.report_id),
                    policies,
                };
                (domain, report)
            })
            .collect()
    }
}

/// The `mailto:` addresses of a `_smtp._tls` TXT record set (`v=TLSRPTv1; rua=…`), at most 5.
/// `https:` destinations are not supported and left out.
pub fn mailto_rua(records: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r.trim_start().starts_with("v=TLSRPTv1")) {
        for tag in r.split(';') {
            let Some(v) = tag.trim().strip_prefix("rua=") else { continue };
            for uri in v.split(',') {
                if let Some(addr) = uri.trim().strip_prefix("mailto:") {
                    // Percent-encoding in a mailto URI is rare; an address that needs it is skipped.
                    let addr = addr.split('?').next().unwrap_or("");
                    if addr.contains('@') && !addr.contains(['%', ' ', '<', '>']) && out.len() < 5 {
                        out.push(addr.to_string());
                    }
                }
            }
        }
    }
    out
}

/// The mail carrying `report` about `domain` (RFC 8460 §5.3): `multipart/report;
/// report-type="tlsrpt"`, a short text and the gzipped JSON.
pub fn message(report: &Report, domain: &str, hostname: &str, to: &[String], now: u64) -> Vec<u8> {
    use mail_builder::headers::content_type::ContentType;
    use mail_builder::headers::raw::Raw;
    use mail_builder::mime::{BodyPart, MimePart};
    use std::io::Write;
    let json = serde_json::to_vec(report).unwrap_or_default();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let gzipped = gz.write_all(&json).and_then(|_| gz.finish()).unwrap_or_default();
    let start = report.date_range.start_datetime.replace([':', '-'], "");
    let end = report.date_range.end_datetime.replace([':', '-'], "");
    let file = format!("{hostname}!{domain}!{start}!{end}.json.gz");
    let text = format!(
        "This is an aggregate TLS report (RFC 8460) from {hostname} about mail to {domain}          from {} to {}.
",
        report.date_range.start_datetime, report.date_range.end_datetime
    );
    let parts = vec![
        MimePart::new(ContentType::new("text/plain").attribute("charset", "utf-8"), BodyPart::from(text)),
        MimePart::new(ContentType::new("application/tlsrpt+gzip"), BodyPart::Binary(gzipped.into())).attachment(file),
    ];
    let body = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "tlsrpt"),
        BodyPart::Multipart(parts),
    );
    mail_builder::MessageBuilder::new()
        .from(("TLS reports".to_string(), format!("tlsrpt-noreply@{hostname}")))
        .to(to.iter().map(|t| t.as_str()).collect::<Vec<_>>())
        // Raw: the subject is ASCII and under 998 bytes; encoded words would hide it from filters.
        .header(
            "Subject",
            Raw::new(format!("Report Domain: {domain} Submitter: {hostname} Report-ID: <{}>", report.report_id)),
        )
        .header("TLS-Report-Domain", Raw::new(domain.to_string()))
        .header("TLS-Report-Submitter", Raw::new(hostname.to_string()))
        .header("Auto-Submitted", Raw::new("auto-generated"))
        .date(now as i64)
        .message_id(format!("tlsrpt.{}.{domain}@{hostname}", now))
        .body(body)
        .write_to_vec()
        .unwrap_or_default()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub organization_name: String,
    pub date_range: DateRange,
    pub contact_info: String,
    pub report_id: String,
    pub policies: Vec<PolicyReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DateRange {
    pub start_datetime: String,
    pub end_datetime: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyReport {
    pub policy: Policy,
    pub summary: Summary,
    pub failure_details: Vec<FailureDetail>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Policy {
    pub policy_type: &'static str,
    pub policy_domain: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Summary {
    pub total_successful_session_count: u64,
    pub total_failure_session_count: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FailureDetail {
    pub result_type: &'static str,
    pub receiving_mx_hostname: String,
    pub receiving_ip: String,
    pub failed_session_count: u64,
}

/// The RFC 8460 result type of a failed TLS session, from our failure's text.
pub fn result_type(text: &str, tls_missing: bool) -> &'static str {
    if tls_missing {
        return "starttls-not-supported";
    }
    let t = text.to_ascii_lowercase();
    if t.contains("tlsa mismatch") {
        "tlsa-invalid"
    } else if t.contains("mta-sts") {
        "validation-failure"
    } else if t.contains("notvalidforname") || t.contains("not valid for name") {
        "certificate-host-mismatch"
    } else if t.contains("expired") {
        "certificate-expired"
    } else if t.contains("unknownissuer") || t.contains("unknown issuer") || t.contains("not trusted") {
        "certificate-not-trusted"
    } else {
        "validation-failure"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_types() {
        for (text, missing, want) in [
            ("x did not offer STARTTLS", true, "starttls-not-supported"),
            ("DANE: certificate of mx does not match: TLSA mismatch: no certificate", false, "tlsa-invalid"),
            (
                "certificate of mx not trusted: invalid peer certificate: NotValidForName",
                false,
                "certificate-host-mismatch",
            ),
            ("invalid peer certificate: Expired", false, "certificate-expired"),
            (
                "certificate of mx not trusted: invalid peer certificate: UnknownIssuer",
                false,
                "certificate-not-trusted",
            ),
            ("MTA-STS: none of the MX hosts of d is in its policy", false, "validation-failure"),
            ("TLS handshake with mx failed: received corrupt message", false, "validation-failure"),
        ] {
            assert_eq!(result_type(text, missing), want, "{text}");
        }
    }

    #[test]
    fn rua_addresses() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            mailto_rua(&s(&["v=TLSRPTv1; rua=mailto:tls@example.org,https://r.example.org/x"])),
            vec!["tls@example.org".to_string()]
        );
        assert_eq!(mailto_rua(&s(&["v=spf1 -all"])), Vec::<String>::new());
        assert_eq!(mailto_rua(&s(&["v=TLSRPTv1;rua=mailto:a@b.org?subject=x , mailto:c@d.org"])).len(), 2);
        let many =
            format!("v=TLSRPTv1; rua={}", (0..20).map(|i| format!("mailto:r{i}@x.org")).collect::<Vec<_>>().join(","));
        assert_eq!(mailto_rua(&[many]).len(), 5);
    }

    #[test]
    fn report_mail() {
        let c = Counts::default();
        let day = 20_000 * 86_400;
        c.record("example.org", "sts", Session::Success, day + 10);
        c.record("other.org", "no-policy-found", Session::Success, day + 10);
        let reports = c.report("mx.example.com", false, day + 20).per_domain();
        assert_eq!(reports.len(), 2);
        let (domain, r) = &reports[0];
        let m = String::from_utf8(message(r, domain, "mx.example.com", &["tls@example.org".into()], day + 30)).unwrap();
        for want in [
            "TLS-Report-Domain: example.org",
            "TLS-Report-Submitter: mx.example.com",
            "report-type=\"tlsrpt\"",
            "application/tlsrpt+gzip",
            "Subject: Report Domain: example.org Submitter: mx.example.com",
            "To: <tls@example.org>",
        ] {
            assert!(m.contains(want), "{want} missing:\n{m}");
        }
    }

    #[test]
    fn days_and_bounds() {
        let c = Counts::default();
        let day = 20_000 * 86_400;
        c.record("Example.org", "sts", Session::Success, day + 10);
        c.record("example.org", "sts", Session::Success, day + 20);
        let fail = || Session::Failure {
            result_type: "certificate-not-trusted",
            mx: "mx.example.org",
            ip: "192.0.2.1".into(),
        };
        c.record("example.org", "sts", fail(), day + 30);
        c.record("example.org", "sts", fail(), day + 40);
        let r = c.report("mx.example.com", false, day + 50);
        assert_eq!(r.policies.len(), 1);
        let p = &r.policies[0];
        assert_eq!((p.summary.total_successful_session_count, p.summary.total_failure_session_count), (2, 2));
        assert_eq!(p.failure_details[0].failed_session_count, 2);
        assert_eq!(r.date_range.start_datetime, crate::protocol::received::rfc3339_utc(day));
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains("\"policy-type\":\"sts\"") && json.contains("\"total-failure-session-count\":2"),
            "{json}"
        );
        // The next day: yesterday's report is the complete one, today's starts empty.
        c.record("example.org", "no-policy-found", Session::Success, day + 86_400 + 5);
        assert_eq!(c.report("h", true, day + 86_400 + 10).policies[0].summary.total_successful_session_count, 2);
        assert_eq!(c.report("h", false, day + 86_400 + 10).policies[0].policy.policy_type, "no-policy-found");
        // Two days later, nothing of the first day is left.
        c.record("a.org", "sts", Session::Success, day + 3 * 86_400);
        assert!(c.report("h", true, day + 3 * 86_400).policies.is_empty());
        // Bounded: failure rows per domain.
        for i in 0..100 {
            c.record(
                "b.org",
                "sts",
                Session::Failure { result_type: "validation-failure", mx: &format!("mx{i}"), ip: String::new() },
                day + 3 * 86_400,
            );
        }
        let r = c.report("h", false, day + 3 * 86_400);
        let b = r.policies.iter().find(|p| p.policy.policy_domain == "b.org").unwrap();
        assert_eq!((b.summary.total_failure_session_count, b.failure_details.len()), (100, MAX_DETAILS));
    }
}
