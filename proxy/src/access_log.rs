//! Access log: one line per request on stdout, JSON unless the configuration gives a format
//! (the global ConfigMap's `log-format-upstream`, as nginx's `log_format`).
//!
//! Workers never write to stdout themselves (a slow terminal or pipe would block them): they
//! hand finished lines to a writer thread through a bounded channel, and count a line as dropped
//! when the channel is full.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use serde::Serialize;
use tidegate_snapshot::{LogEscape, TemplatePart};

/// Lines buffered between the workers and the writer.
const BUFFERED_LINES: usize = 16_384;

#[derive(Debug, Serialize)]
pub(crate) struct Entry {
    /// Seconds since the Unix epoch, with milliseconds.
    pub(crate) ts: f64,
    pub(crate) remote_addr: String,
    pub(crate) method: String,
    pub(crate) host: String,
    pub(crate) path: String,
    pub(crate) protocol: &'static str,
    pub(crate) status: u16,
    pub(crate) bytes_sent: u64,
    /// Whether the whole body reached the client.
    pub(crate) completed: bool,
    pub(crate) request_time_ms: f64,
    pub(crate) upstream: Option<String>,
    pub(crate) upstream_time_ms: Option<f64>,
    pub(crate) route: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    sender: Option<SyncSender<String>>,
}

impl AccessLog {
    pub(crate) fn start(enabled: bool) -> std::io::Result<Self> {
        if !enabled {
            return Ok(AccessLog { sender: None });
        }
        let (sender, receiver) = sync_channel(BUFFERED_LINES);
        std::thread::Builder::new().name("access-log".into()).spawn(move || write_lines(&receiver))?;
        Ok(AccessLog { sender: Some(sender) })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues an entry, as a JSON line or as `format` writes it; returns false when it had to
    /// be dropped.
    pub(crate) fn record(&self, entry: &Entry, format: Option<(&LineFormat, &Taken)>) -> bool {
        let Some(sender) = &self.sender else { return true };
        let line = match format {
            Some((format, taken)) => format.render(entry, taken),
            None => match serde_json::to_string(entry) {
                Ok(line) => line,
                Err(_) => return false,
            },
        };
        match sender.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

fn write_lines(receiver: &Receiver<String>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Ok(line) = receiver.recv() {
        let _ = writeln!(out, "{line}");
        // Drain what is queued, then flush once, so a burst costs one write.
        while let Ok(line) = receiver.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

/// A compiled `log-format-upstream` (nginx's `log_format`): the line's text with the request's
/// variables put in, compiled once per runtime.
#[derive(Debug)]
pub(crate) struct LineFormat {
    parts: Vec<Part>,
    escape: LogEscape,
    /// Request headers the format uses (`$http_NAME`), in the order [`Taken::headers`] keeps.
    headers: Vec<http::HeaderName>,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Var(Var),
}

#[derive(Debug, Clone, Copy)]
enum Var {
    RemoteAddr,
    RemoteUser,
    TimeLocal,
    TimeIso8601,
    Msec,
    Request,
    Method,
    RequestUri,
    Uri,
    Args,
    Protocol,
    Scheme,
    Host,
    Status,
    BodyBytesSent,
    RequestTime,
    RequestLength,
    UpstreamAddr,
    UpstreamResponseTime,
    UpstreamStatus,
    UpstreamName,
    RequestId,
    Namespace,
    IngressName,
    ServiceName,
    ServicePort,
    /// Logged as `-`: tidegate has no value for it.
    Nothing,
    Header(usize),
}

/// What a formatted line needs from the request, taken as it starts (only when the access log
/// has a format).
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) request_uri: String,
    pub(crate) remote_user: String,
    pub(crate) scheme: &'static str,
    pub(crate) request_length: u64,
    pub(crate) request_id: String,
    pub(crate) headers: Vec<String>,
    /// The backend the route sends to: `namespace/service:port`.
    pub(crate) backend: Option<String>,
    pub(crate) from_upstream: bool,
}

impl LineFormat {
    pub(crate) fn compile(format: &tidegate_snapshot::AccessLogFormat) -> LineFormat {
        let mut parts = Vec::new();
        let mut headers = Vec::new();
        // The controller checked the format: one that does not split is logged as written.
        let runs = tidegate_snapshot::nginx_runs(&format.format)
            .unwrap_or_else(|_| vec![TemplatePart::Text(format.format.clone())]);
        for run in runs {
            let name = match run {
                TemplatePart::Text(text) => {
                    parts.push(Part::Text(text));
                    continue;
                }
                TemplatePart::Variable(name) => name,
            };
            let var = match name.as_str() {
                "remote_addr" => Var::RemoteAddr,
                "remote_user" => Var::RemoteUser,
                "time_local" => Var::TimeLocal,
                "time_iso8601" => Var::TimeIso8601,
                "msec" => Var::Msec,
                "request" => Var::Request,
                "request_method" => Var::Method,
                "request_uri" => Var::RequestUri,
                "uri" => Var::Uri,
                "args" => Var::Args,
                "server_protocol" => Var::Protocol,
                "scheme" => Var::Scheme,
                "host" => Var::Host,
                "status" | "upstream_status_code" => Var::Status,
                "body_bytes_sent" | "bytes_sent" | "upstream_response_length" => Var::BodyBytesSent,
                "request_time" => Var::RequestTime,
                "request_length" => Var::RequestLength,
                "upstream_addr" => Var::UpstreamAddr,
                "upstream_response_time" => Var::UpstreamResponseTime,
                "upstream_status" => Var::UpstreamStatus,
                "proxy_upstream_name" => Var::UpstreamName,
                "req_id" | "request_id" => Var::RequestId,
                "namespace" => Var::Namespace,
                "ingress_name" => Var::IngressName,
                "service_name" => Var::ServiceName,
                "service_port" => Var::ServicePort,
                _ => match name
                    .strip_prefix("http_")
                    .and_then(|h| http::HeaderName::from_bytes(h.replace('_', "-").as_bytes()).ok())
                {
                    Some(header) => {
                        headers.push(header);
                        Var::Header(headers.len() - 1)
                    }
                    None => Var::Nothing,
                },
            };
            parts.push(Part::Var(var));
        }
        LineFormat { parts, escape: format.escape, headers }
    }

    /// What the line will need from `request`, taken before it is consumed.
    pub(crate) fn take(&self, request: &http::Request<crate::body::ClientBody>, tls: bool) -> Taken {
        let head = request.headers();
        let request_uri = request.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let header_bytes: usize = head.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
        let declared = head
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let request_length =
            (request.method().as_str().len() + request_uri.len() + 12 + header_bytes + 2) as u64 + declared;
        let request_id = match head.get("x-request-id").and_then(|v| v.to_str().ok()) {
            Some(id) => id.to_owned(),
            None => format!("{:016x}{:016x}", crate::upstream::random(), crate::upstream::random()),
        };
        Taken {
            remote_user: crate::policy::remote_user(head),
            request_uri,
            scheme: if tls { "https" } else { "http" },
            request_length,
            request_id,
            headers: self
                .headers
                .iter()
                .map(|name| head.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned())
                .collect(),
            backend: None,
            from_upstream: false,
        }
    }

    /// The line for `entry`.
    pub(crate) fn render(&self, entry: &Entry, taken: &Taken) -> String {
        let mut out = String::with_capacity(256);
        let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
        let route_part = |i: usize| {
            entry.route.as_deref().and_then(|r| r.split('/').nth(i)).map_or_else(|| "-".to_owned(), str::to_owned)
        };
        let backend = taken.backend.as_deref();
        for part in &self.parts {
            let value = match part {
                Part::Text(text) => {
                    out.push_str(text);
                    continue;
                }
                Part::Var(var) => match var {
                    Var::RemoteAddr => entry.remote_addr.clone(),
                    Var::RemoteUser => dash(&taken.remote_user),
                    Var::TimeLocal => time_local(entry.ts),
                    Var::TimeIso8601 => time_iso8601(entry.ts),
                    Var::Msec => format!("{:.3}", entry.ts),
                    Var::Request => format!("{} {} {}", entry.method, taken.request_uri, entry.protocol),
                    Var::Method => entry.method.clone(),
                    Var::RequestUri => taken.request_uri.clone(),
                    Var::Uri => entry.path.clone(),
                    Var::Args => dash(taken.request_uri.split_once('?').map_or("", |(_, q)| q)),
                    Var::Protocol => entry.protocol.to_owned(),
                    Var::Scheme => taken.scheme.to_owned(),
                    Var::Host => entry.host.clone(),
                    Var::Status => entry.status.to_string(),
                    Var::BodyBytesSent => entry.bytes_sent.to_string(),
                    Var::RequestTime => format!("{:.3}", entry.request_time_ms / 1000.0),
                    Var::RequestLength => taken.request_length.to_string(),
                    Var::UpstreamAddr => entry.upstream.clone().unwrap_or_else(|| "-".to_owned()),
                    Var::UpstreamResponseTime => {
                        entry.upstream_time_ms.map_or_else(|| "-".to_owned(), |t| format!("{:.3}", t / 1000.0))
                    }
                    Var::UpstreamStatus => {
                        if taken.from_upstream {
                            entry.status.to_string()
                        } else {
                            "-".to_owned()
                        }
                    }
                    // ingress-nginx's `namespace-service-port`.
                    Var::UpstreamName => {
                        backend.map_or_else(|| "-".to_owned(), |b| b.replacen('/', "-", 1).replacen(':', "-", 1))
                    }
                    Var::RequestId => taken.request_id.clone(),
                    Var::Namespace => route_part(0),
                    Var::IngressName => route_part(1),
                    Var::ServiceName => backend
                        .and_then(|b| b.split_once('/'))
                        .and_then(|(_, s)| s.split(':').next())
                        .map_or_else(|| "-".to_owned(), str::to_owned),
                    Var::ServicePort => {
                        backend.and_then(|b| b.rsplit_once(':')).map_or_else(|| "-".to_owned(), |(_, p)| p.to_owned())
                    }
                    Var::Nothing => "-".to_owned(),
                    Var::Header(i) => taken.headers.get(*i).cloned().unwrap_or_else(|| "-".to_owned()),
                },
            };
            escape_into(&mut out, &value, self.escape);
        }
        out
    }
}

fn escape_into(out: &mut String, value: &str, escape: LogEscape) {
    use std::fmt::Write as _;
    match escape {
        LogEscape::None => out.push_str(value),
        LogEscape::Json => {
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if (c as u32) < 0x20 => {
                        let _ = write!(out, "\\u{:04x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
        }
        LogEscape::Default => {
            for byte in value.bytes() {
                match byte {
                    b'"' | b'\\' => {
                        let _ = write!(out, "\\x{byte:02X}");
                    }
                    b' '..=b'~' => out.push(byte as char),
                    _ => {
                        let _ = write!(out, "\\x{byte:02X}");
                    }
                }
            }
        }
    }
}

/// (year, month, day, hour, minute, second) in UTC of `ts` seconds since the epoch.
fn civil(ts: f64) -> (i64, u32, u32, u32, u32, u32) {
    let secs = ts.floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

/// nginx's `$time_local` in UTC: `07/Dec/2026:21:55:00 +0000`.
fn time_local(ts: f64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (y, mo, d, h, mi, s) = civil(ts);
    format!("{d:02}/{}/{y}:{h:02}:{mi:02}:{s:02} +0000", MONTHS[(mo as usize).saturating_sub(1) % 12])
}

/// nginx's `$time_iso8601` in UTC: `2026-12-07T21:55:00+00:00`.
fn time_iso8601(ts: f64) -> String {
    let (y, mo, d, h, mi, s) = civil(ts);
    format!("{y}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}+00:00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_nginx_s() {
        // 2026-12-07T21:55:09Z
        let ts = 1_796_680_509.25;
        assert_eq!(time_local(ts), "07/Dec/2026:21:55:09 +0000");
        assert_eq!(time_iso8601(ts), "2026-12-07T21:55:09+00:00");
        assert_eq!(time_iso8601(951_782_400.0), "2000-02-29T00:00:00+00:00");
    }

    #[test]
    fn values_are_escaped_as_asked() {
        let mut out = String::new();
        escape_into(&mut out, "a\"b\\c\n", LogEscape::Default);
        assert_eq!(out, "a\\x22b\\x5Cc\\x0A");
        out.clear();
        escape_into(&mut out, "a\"b\\c\n", LogEscape::Json);
        assert_eq!(out, "a\\\"b\\\\c\\n");
    }
}
