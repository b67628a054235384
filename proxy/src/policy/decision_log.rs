//! The policy decision log: one JSON object per decision, as OPA's decision
//! logs have them (decision id, request id, policy and version, result,
//! reason, duration, and the input with its sensitive headers redacted).
//!
//! The request path moves the input (a reference-counted value, not a
//! copy) and a few scalars into the log's bounded queue; redaction,
//! serialisation and I/O happen on the log's own thread. When the writer
//! falls behind, records are dropped and counted, never waited for.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use regorus::Value;

use crate::config::DecisionLogSettings;
use crate::telemetry::access_log::{LineLog, LogLine};

/// What replaces a redacted header's value.
const REDACTED: &str = "[REDACTED]";

/// The decision-log sink. Cloning shares the one writer.
#[derive(Debug, Clone)]
pub struct DecisionLog {
    log: LineLog<DecisionRecord>,
    settings: Arc<DecisionLogSettings>,
}

impl DecisionLog {
    /// Opens the log's file again before its next line (rotation).
    pub fn reopen(&self) {
        self.log.reopen();
    }

    /// Opens the target and starts the writer thread.
    pub fn start(settings: &DecisionLogSettings) -> std::io::Result<Self> {
        Ok(Self {
            log: LineLog::start_named(&settings.target, (), "weft-decision-log")?,
            settings: Arc::new(settings.clone()),
        })
    }

    /// Whether decisions with this result are logged.
    pub(crate) fn wants(&self, result: &str) -> bool {
        result != "allow" || self.settings.include_allowed
    }

    /// Queues one decision without blocking.
    pub(crate) fn record(&self, record: Decision) {
        self.log.log(DecisionRecord {
            decision: record,
            settings: self.settings.clone(),
        });
    }

    /// Records dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.log.dropped()
    }

    /// A log whose records stay in the returned queue.
    #[cfg(test)]
    pub(crate) fn for_tests(
        settings: &DecisionLogSettings,
    ) -> (Self, std::sync::mpsc::Receiver<DecisionRecord>) {
        let (log, rx) = LineLog::queue_for_tests(64);
        (
            Self {
                log,
                settings: Arc::new(settings.clone()),
            },
            rx,
        )
    }
}

/// One decision, as the request path hands it over.
#[derive(Debug)]
pub(crate) struct Decision {
    pub(crate) time: SystemTime,
    pub(crate) policy: Arc<str>,
    pub(crate) version: u64,
    /// `allow`, `deny`, `audit_deny` or `error`.
    pub(crate) result: &'static str,
    pub(crate) reason: Option<String>,
    pub(crate) duration: Duration,
    pub(crate) input: Value,
}

#[derive(Debug)]
pub(crate) struct DecisionRecord {
    decision: Decision,
    settings: Arc<DecisionLogSettings>,
}

/// A decision id: unique within the process and across restarts (a
/// random prefix drawn at start, then a counter), shaped as a UUID.
fn decision_id() -> String {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| crate::rng::with_thread_rng(|rng| rng.u64(..)));
    let n = COUNTER.fetch_add(1, Relaxed);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        prefix >> 32,
        (prefix >> 16) & 0xffff,
        prefix & 0x0fff,
        (n >> 48) & 0x0fff,
        n & 0xffff_ffff_ffff
    )
}

impl DecisionRecord {
    /// The log line's JSON object.
    fn to_json(&self) -> serde_json::Value {
        let d = &self.decision;
        let mut input = serde_json::to_value(&d.input).unwrap_or(serde_json::Value::Null);
        let request = input.pointer_mut("/attributes/request/http");
        let mut request_id = serde_json::Value::Null;
        if let Some(http) = request {
            if let Some(id) = http.get("id") {
                request_id = id.clone();
            }
            if let Some(serde_json::Value::Object(headers)) = http.get_mut("headers") {
                for name in &self.settings.redact_headers {
                    if let Some(value) = headers.get_mut(name.as_str()) {
                        *value = serde_json::Value::from(REDACTED);
                    }
                }
            }
        }
        serde_json::json!({
            "time": humantime::format_rfc3339_micros(d.time).to_string(),
            "decision_id": decision_id(),
            "request_id": request_id,
            "policy": &*d.policy,
            "policy_version": format!("{:016x}", d.version),
            "result": d.result,
            "reason": d.reason,
            "duration_us": u64::try_from(d.duration.as_micros()).unwrap_or(u64::MAX),
            "input": input,
        })
    }
}

impl LogLine for DecisionRecord {
    type Format = ();

    fn write_line(&self, (): &(), out: &mut impl Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, &self.to_json())?;
        out.write_all(b"\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessLogTarget;

    fn settings(include_allowed: bool) -> Arc<DecisionLogSettings> {
        Arc::new(DecisionLogSettings {
            target: AccessLogTarget::Stderr,
            redact_headers: vec!["authorization".into(), "cookie".into(), "x-api-key".into()],
            include_allowed,
        })
    }

    fn input() -> Value {
        Value::from(serde_json::json!({
            "attributes": {"request": {"http": {
                "id": "req-1",
                "method": "GET",
                "headers": {
                    "authorization": "Bearer secret-token",
                    "cookie": "session=abc",
                    "x-api-key": "k",
                    "user-agent": "curl/8",
                }
            }}}
        }))
    }

    #[test]
    fn a_line_carries_ids_policy_result_and_the_redacted_input() {
        let record = DecisionRecord {
            decision: Decision {
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                policy: "authz".into(),
                version: 0xabc,
                result: "deny",
                reason: Some("no DELETE".into()),
                duration: Duration::from_micros(12),
                input: input(),
            },
            settings: settings(true),
        };
        let mut line = Vec::new();
        record.write_line(&(), &mut line).unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(json["request_id"], "req-1");
        assert_eq!(json["policy"], "authz");
        assert_eq!(json["policy_version"], "0000000000000abc");
        assert_eq!(json["result"], "deny");
        assert_eq!(json["reason"], "no DELETE");
        assert_eq!(json["duration_us"], 12);
        assert_eq!(json["time"], "2023-11-14T22:13:20.000000Z");
        let headers = &json["input"]["attributes"]["request"]["http"]["headers"];
        assert_eq!(headers["authorization"], REDACTED);
        assert_eq!(headers["cookie"], REDACTED);
        assert_eq!(headers["x-api-key"], REDACTED);
        assert_eq!(headers["user-agent"], "curl/8");
        assert!(!String::from_utf8_lossy(&line).contains("secret-token"));
        let id = json["decision_id"].as_str().unwrap();
        assert_eq!(id.len(), 36, "{id}");
    }

    #[test]
    fn decision_ids_do_not_repeat() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| decision_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn allowed_decisions_are_logged_only_when_asked() {
        let (log, _rx) = LineLog::<DecisionRecord>::queue_for_tests(4);
        let quiet = DecisionLog {
            log: log.clone(),
            settings: settings(false),
        };
        assert!(!quiet.wants("allow"));
        assert!(quiet.wants("deny") && quiet.wants("audit_deny") && quiet.wants("error"));
        let all = DecisionLog {
            log,
            settings: settings(true),
        };
        assert!(all.wants("allow"));
    }
}
