//! The `Received:` trace header (RFC 5321 §4.4) and RFC 5322 dates, formatted from a Unix time
//! passed in by the caller.

use std::net::IpAddr;

/// Formats `secs` since the epoch as an RFC 5322 date in UTC, e.g. `Sat, 28 Nov 2026 21:47:37 +0000`
/// (mail-builder's formatter; the day of the month has no leading zero, as RFC 5322 allows).
pub fn rfc5322_date(secs: u64) -> String {
    mail_builder::headers::date::Date::new(i64::try_from(secs).unwrap_or(i64::MAX)).to_rfc822()
}

/// Year, month and day (UTC) of a Unix time, for the protocol log's daily file names. Kept here
/// (mail-builder formats whole dates only): Howard Hinnant's algorithm, table-tested below.
pub fn civil_date(secs: u64) -> (i64, u32, u32) {
    civil_from_days((secs / 86_400) as i64)
}

/// A Unix time as an RFC 3339 UTC timestamp (`2026-12-02T16:40:05Z`), for logs a person reads.
pub fn rfc3339_utc(secs: u64) -> String {
    let (y, m, d) = civil_date(secs);
    let t = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", t / 3600, t / 60 % 60, t % 60)
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Replaces anything outside a conservative set with `?`, so a client-chosen HELO name cannot
/// break the header's structure (comments, folding) or smuggle control characters.
pub fn sanitize(name: &str) -> String {
    name.chars().take(255).map(|c| if c.is_ascii_alphanumeric() || "-._:[]".contains(c) { c } else { '?' }).collect()
}

/// Where a message came from, for the trace header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Smtp {
        helo: String,
        ip: IpAddr,
        protocol: &'static str,
        /// Reverse DNS, when looked up: the client's forward-confirmed name, or `None`.
        client_name: Option<Option<String>>,
    },
    Pickup,
    /// Made by this server (delivery status notifications).
    Local,
}

/// The complete `Received:` header, folded, CRLF-terminated. `for` names the recipient only when
/// there is exactly one, so a Bcc'd list is not disclosed.
pub fn received_header(origin: &Origin, hostname: &str, id: u64, single_rcpt: Option<&str>, now: u64) -> String {
    let from = match origin {
        Origin::Smtp { helo, ip, protocol, client_name } => {
            // RFC 5321 §4.4 TCP-info: "(name [ip])" when reverse DNS was looked up, with a note
            // when the EHLO name is not that name.
            let tcp_info = match client_name {
                None => format!("[{ip}]"),
                Some(Some(name)) if name.eq_ignore_ascii_case(helo) => format!("{} [{ip}]", sanitize(name)),
                Some(Some(name)) => format!("{} [{ip}]; EHLO name does not match", sanitize(name)),
                Some(None) => format!("unknown [{ip}]; no verified reverse DNS"),
            };
            format!("from {} ({tcp_info})\r\n\tby {} (mailroot) with {} id {}", sanitize(helo), hostname, protocol, id)
        }
        Origin::Pickup => format!("from pickup\r\n\tby {} (mailroot) with local id {}", hostname, id),
        Origin::Local => format!("by {} (mailroot) with local id {}", hostname, id),
    };
    let for_part = match single_rcpt {
        Some(r) if r.len() <= 256 && !r.contains(['\r', '\n']) => format!("\r\n\tfor <{r}>"),
        _ => String::new(),
    };
    format!("Received: {from}{for_part};\r\n\t{}\r\n", rfc5322_date(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (1_796_209_132, "2026-12-02T10:58:52Z"),
            (951_782_399, "2000-02-28T23:59:59Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
        ] {
            assert_eq!(rfc3339_utc(secs), want, "secs {secs}");
        }
    }

    #[test]
    fn dates() {
        let cases = [
            (0, "Thu, 1 Jan 1970 00:00:00 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (1_795_902_457, "Sat, 28 Nov 2026 21:47:37 +0000"),
            (4_102_444_799, "Thu, 31 Dec 2099 23:59:59 +0000"),
            (u64::MAX, "Sun, 4 Dec 292277026596 15:30:07 +0000"),
        ];
        for (secs, want) in cases {
            assert_eq!(rfc5322_date(secs), want, "secs {secs}");
        }
        for (secs, ymd) in [(0, (1970, 1, 1)), (951_782_400, (2000, 2, 29)), (1_795_902_457, (2026, 11, 28))] {
            assert_eq!(civil_date(secs), ymd, "secs {secs}");
        }
    }

    #[test]
    fn header() {
        let ip = "127.0.0.1".parse().unwrap();
        let smtp = |helo: &str, client_name: Option<Option<&str>>| Origin::Smtp {
            helo: helo.into(),
            ip,
            protocol: "ESMTP",
            client_name: client_name.map(|n| n.map(str::to_string)),
        };
        let first_line =
            |o: &Origin| received_header(o, "mx.test", 1, None, 0).lines().next().unwrap_or("").to_string();
        let cases = [
            (smtp("a.test", None), "Received: from a.test ([127.0.0.1])"),
            (smtp("A.test", Some(Some("a.test"))), "Received: from A.test (a.test [127.0.0.1])"),
            (
                smtp("b.test", Some(Some("a.test"))),
                "Received: from b.test (a.test [127.0.0.1]; EHLO name does not match)",
            ),
            (smtp("b.test", Some(None)), "Received: from b.test (unknown [127.0.0.1]; no verified reverse DNS)"),
        ];
        for (o, want) in cases {
            assert_eq!(first_line(&o), want);
        }
        let o = smtp("bad (name)\r\n", None);
        assert_eq!(
            received_header(&o, "mx.test", 7, Some("a@b.test"), 0),
            "Received: from bad??name??? ([127.0.0.1])\r\n\tby mx.test (mailroot) with ESMTP id 7\r\n\tfor <a@b.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
        assert_eq!(
            received_header(&Origin::Pickup, "mx.test", 8, None, 0),
            "Received: from pickup\r\n\tby mx.test (mailroot) with local id 8;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
    }
}
