//! Alerts: the daemon reconciles the set of conditions that hold now
//! (a breached budget, a failed job, a WAL gap, the stream down, …) with
//! the set that held before. A condition that appears fires once; one that
//! clears sends its resolution once; nothing repeats while it holds. Each
//! sink is also rate-limited ([`MAX_PER_HOUR`]), so a flapping condition
//! cannot flood a pager.
//!
//! Sinks: a JSON webhook, a Slack-compatible webhook, email over SMTP
//! (STARTTLS), and a command.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Notifications one sink sends per hour at most; beyond, they are
/// dropped and counted in the next one that goes out.
pub const MAX_PER_HOUR: usize = 30;

/// An `[[alert]]` entry of walvault.toml: exactly one of `webhook`,
/// `slack`, `email`, `run`.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// A name for the logs (default: the kind).
    pub name: Option<String>,
    /// POST a JSON document to this URL.
    pub webhook: Option<String>,
    /// POST a Slack-compatible `{"text": …}` to this incoming-webhook URL.
    pub slack: Option<String>,
    /// Send an email.
    pub email: Option<EmailConfig>,
    /// Run this command with `sh -c`; the alert is in its environment
    /// (`WALVAULT_ALERT_STATE`, `_KEY`, `_SUMMARY`) and, as JSON, on its
    /// standard input.
    pub run: Option<String>,
}

/// How to send email.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The SMTP server, `host:port` (port default 587).
    pub smtp: String,
    /// The sender.
    pub from: String,
    /// The recipients.
    pub to: Vec<String>,
    /// `required` (default: STARTTLS or fail), `opportunistic` (STARTTLS
    /// when offered), `none` (plain, for a relay on localhost).
    pub tls: Option<String>,
    /// SMTP user name.
    pub user: Option<String>,
    /// File holding the SMTP password.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate (a relay
    /// with a private CA); default: the public web roots.
    pub ca_file: Option<PathBuf>,
}

impl SinkConfig {
    /// Exactly one kind, and values that can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let kinds = [
            self.webhook.is_some(),
            self.slack.is_some(),
            self.email.is_some(),
            self.run.is_some(),
        ]
        .iter()
        .filter(|&&k| k)
        .count();
        if kinds != 1 {
            return Err(ConfigError::new(
                "alert",
                self.name.clone().unwrap_or_default(),
                "each [[alert]] names exactly one of webhook, slack, email, run",
            ));
        }
        for (key, url) in [("webhook", &self.webhook), ("slack", &self.slack)] {
            if let Some(u) = url {
                let ok = u.parse::<hyper::Uri>().ok().is_some_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                });
                if !ok {
                    return Err(ConfigError::new(
                        &format!("alert.{key}"),
                        u,
                        "give an http:// or https:// URL",
                    ));
                }
            }
        }
        if let Some(e) = &self.email {
            if e.to.is_empty() {
                return Err(ConfigError::new(
                    "alert.email.to",
                    "",
                    "name at least one recipient",
                ));
            }
            for a in e.to.iter().chain([&e.from]) {
                if a.parse::<lettre::message::Mailbox>().is_err() {
                    return Err(ConfigError::new("alert.email", a, "not an email address"));
                }
            }
            if let Some(t) = &e.tls {
                if !matches!(t.as_str(), "required" | "opportunistic" | "none") {
                    return Err(ConfigError::new(
                        "alert.email.tls",
                        t,
                        "use required, opportunistic or none",
                    ));
                }
            }
        }
        Ok(())
    }

    fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            match (&self.webhook, &self.slack, &self.email) {
                (Some(_), _, _) => "webhook",
                (_, Some(_), _) => "slack",
                (_, _, Some(_)) => "email",
                _ => "command",
            }
            .to_owned()
        })
    }
}

/// Firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition began.
    Firing,
    /// It cleared.
    Resolved,
}

/// One notification.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// Firing or resolved.
    pub state: AlertState,
    /// The condition (`budget:max_rpo`, `job:backup`, …).
    pub key: String,
    /// What is (or was) wrong.
    pub summary: String,
    /// The stanza.
    pub stanza: String,
    /// When the condition began.
    pub since: DateTime<Utc>,
    /// Now.
    pub at: DateTime<Utc>,
    /// Notifications this sink dropped to its rate limit since its last.
    pub suppressed: usize,
}

/// The conditions and what was sent.
#[derive(Debug, Default)]
pub struct Alerter {
    active: BTreeMap<String, (String, DateTime<Utc>)>,
}

impl Alerter {
    /// Compare `now` (key → summary) with the conditions before; the
    /// notifications due.
    pub fn reconcile(&mut self, stanza: &str, now: &BTreeMap<String, String>) -> Vec<Alert> {
        let t = Utc::now();
        let mut out = Vec::new();
        let gone: Vec<String> = self
            .active
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some((summary, since)) = self.active.remove(&k) {
                out.push(Alert {
                    state: AlertState::Resolved,
                    key: k,
                    summary,
                    stanza: stanza.to_owned(),
                    since,
                    at: t,
                    suppressed: 0,
                });
            }
        }
        for (k, summary) in now {
            if !self.active.contains_key(k) {
                self.active.insert(k.clone(), (summary.clone(), t));
                out.push(Alert {
                    state: AlertState::Firing,
                    key: k.clone(),
                    summary: summary.clone(),
                    stanza: stanza.to_owned(),
                    since: t,
                    at: t,
                    suppressed: 0,
                });
            }
        }
        out
    }

    /// The conditions holding, oldest first.
    pub fn active(&self) -> Vec<(String, String, DateTime<Utc>)> {
        let mut v: Vec<_> = self
            .active
            .iter()
            .map(|(k, (s, t))| (k.clone(), s.clone(), *t))
            .collect();
        v.sort_by_key(|a| a.2);
        v
    }
}

/// A sink and its rate limit.
pub struct Sink {
    config: SinkConfig,
    sent: VecDeque<Instant>,
    dropped: usize,
}

impl Sink {
    /// A sink of `config`.
    pub fn new(config: SinkConfig) -> Sink {
        Sink {
            config,
            sent: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Whether the rate limit lets one more go now; counts it.
    fn admit(&mut self) -> bool {
        let hour = Duration::from_secs(3600);
        while self.sent.front().is_some_and(|t| t.elapsed() > hour) {
            self.sent.pop_front();
        }
        if self.sent.len() >= MAX_PER_HOUR {
            self.dropped += 1;
            return false;
        }
        self.sent.push_back(Instant::now());
        true
    }

    /// Send `alert` in the background (delivery retries three times);
    /// dropped when over the rate limit.
    pub fn send(&mut self, alert: &Alert) {
        if !self.admit() {
            tracing::warn!(
                sink = self.config.label(),
                key = alert.key,
                "alert dropped: rate limit"
            );
            return;
        }
        let mut alert = alert.clone();
        alert.suppressed = std::mem::take(&mut self.dropped);
        let config = self.config.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(2);
            for attempt in 1..=3 {
                match deliver(&config, &alert).await {
                    Ok(()) => {
                        tracing::info!(sink = config.label(), key = alert.key, state = ?alert.state, "alert sent");
                        return;
                    }
                    Err(e) if attempt < 3 => {
                        tracing::warn!(
                            sink = config.label(),
                            "alert not delivered ({e}); retrying"
                        );
                        tokio::time::sleep(wait).await;
                        wait *= 4;
                    }
                    Err(e) => tracing::error!(
                        sink = config.label(),
                        key = alert.key,
                        "alert not delivered after 3 attempts: {e}"
                    ),
                }
            }
        });
    }
}

fn headline(a: &Alert) -> String {
    let state = match a.state {
        AlertState::Firing => "FIRING",
        AlertState::Resolved => "RESOLVED",
    };
    format!("[walvault {}] {state}: {}", a.stanza, a.summary)
}

async fn deliver(config: &SinkConfig, alert: &Alert) -> Result<(), String> {
    if let Some(url) = &config.webhook {
        let body = serde_json::to_vec(alert).map_err(|e| e.to_string())?;
        return post_json(url, body).await;
    }
    if let Some(url) = &config.slack {
        let body = serde_json::to_vec(&serde_json::json!({ "text": headline(alert) }))
            .map_err(|e| e.to_string())?;
        return post_json(url, body).await;
    }
    if let Some(e) = &config.email {
        return send_email(e, alert).await;
    }
    if let Some(cmd) = &config.run {
        return run_command(cmd, alert).await;
    }
    Ok(())
}

async fn post_json(url: &str, body: Vec<u8>) -> Result<(), String> {
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("walvault/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| format!("{url}: no answer in 30 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {}", resp.status()))
    }
}

async fn send_email(e: &EmailConfig, alert: &Alert) -> Result<(), String> {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let (host, port) = match e.smtp.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            p.parse::<u16>()
                .map_err(|_| format!("smtp {:?}: bad port", e.smtp))?,
        ),
        None => (e.smtp.clone(), 587),
    };
    let mut msg = Message::builder()
        .from(
            e.from
                .parse()
                .map_err(|x| format!("from {:?}: {x}", e.from))?,
        )
        .subject(headline(alert));
    for to in &e.to {
        msg = msg.to(to.parse().map_err(|x| format!("to {to:?}: {x}"))?);
    }
    let body = format!(
        "{}\n\ncondition: {}\nstanza: {}\nsince: {}\nat: {}\n{}",
        alert.summary,
        alert.key,
        alert.stanza,
        alert.since.to_rfc3339(),
        alert.at.to_rfc3339(),
        if alert.suppressed > 0 {
            format!(
                "({} earlier alert(s) were dropped by the rate limit)\n",
                alert.suppressed
            )
        } else {
            String::new()
        }
    );
    let msg = msg.body(body).map_err(|x| x.to_string())?;
    let mut tls_params = TlsParameters::builder(host.clone());
    if let Some(ca) = &e.ca_file {
        let pem = std::fs::read(ca).map_err(|x| format!("ca_file {}: {x}", ca.display()))?;
        let cert = lettre::transport::smtp::client::Certificate::from_pem(&pem)
            .map_err(|x| format!("ca_file {}: {x}", ca.display()))?;
        tls_params = tls_params.add_root_certificate(cert);
    }
    let params = tls_params.build_rustls().map_err(|x| x.to_string())?;
    let tls = match e.tls.as_deref() {
        Some("none") => Tls::None,
        Some("opportunistic") => Tls::Opportunistic(params),
        _ => Tls::Required(params),
    };
    let mut t = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .tls(tls)
        .timeout(Some(Duration::from_secs(30)));
    if let Some(user) = &e.user {
        let pass = match &e.password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|x| format!("password_file {}: {x}", p.display()))?
                .trim_end()
                .to_owned(),
            None => String::new(),
        };
        t = t.credentials(Credentials::new(user.clone(), pass));
    }
    t.build()
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|x| format!("smtp {}: {x}", e.smtp))
}

async fn run_command(cmd: &str, alert: &Alert) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let state = match alert.state {
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    };
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("WALVAULT_ALERT_STATE", state)
        .env("WALVAULT_ALERT_KEY", &alert.key)
        .env("WALVAULT_ALERT_SUMMARY", &alert.summary)
        .env("WALVAULT_STANZA", &alert.stanza)
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let body = serde_json::to_vec(alert).unwrap_or_default();
        let _ = stdin.write_all(&body).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .map_err(|_| format!("{cmd:?} ran longer than 60 s"))?
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} exited with {status}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_fires_once_and_resolves_once() {
        let mut a = Alerter::default();
        let mut now = BTreeMap::new();
        now.insert("budget:max_rpo".to_owned(), "RPO 5 s over 1 s".to_owned());
        let sent = a.reconcile("main", &now);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].state, AlertState::Firing);
        // still holding: nothing again, whatever the summary says now
        now.insert("budget:max_rpo".to_owned(), "RPO 6 s over 1 s".to_owned());
        assert!(a.reconcile("main", &now).is_empty());
        let sent = a.reconcile("main", &BTreeMap::new());
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].state, AlertState::Resolved);
        assert!(a.reconcile("main", &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_sink_is_rate_limited() {
        let mut s = Sink::new(SinkConfig::default());
        for _ in 0..MAX_PER_HOUR {
            assert!(s.admit());
        }
        assert!(!s.admit());
        assert_eq!(s.dropped, 1);
    }

    #[test]
    fn each_alert_entry_names_one_sink() {
        let two = SinkConfig {
            webhook: Some("http://x/".into()),
            run: Some("true".into()),
            ..Default::default()
        };
        assert!(two.validate().is_err());
        let bad = SinkConfig {
            webhook: Some("ftp://x/".into()),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("http"));
        let ok = SinkConfig {
            email: Some(EmailConfig {
                smtp: "localhost:25".into(),
                from: "walvault@example.com".into(),
                to: vec!["dba@example.com".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        ok.validate().unwrap();
    }
}
