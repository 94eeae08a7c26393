//! `walvault daemon`: the options (`[daemon]` of walvault.toml, the same
//! struct as the flags), `--check-config`, and the start: the listener is
//! bound and the repository opened before anything runs, so a port in use
//! or an unreachable repository is one line and exit 1. The work is
//! `daemon::run`.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::output::outln;
use super::Settings;
use crate::archive::stream::StreamOptions;
use crate::backup::stream::BaseBackupOptions;
use crate::daemon::{self, CopyTarget, DaemonOptions};
use crate::pg::ConnParams;
use crate::repo::gc::Lease;

/// Options of `walvault daemon`.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Connection to the server (libpq conninfo or postgres:// URL), as a
    /// role with REPLICATION (else `pg` of the config file).
    #[arg(long, env = "WALVAULT_PG")]
    pub pg: Option<String>,
    /// Validate the configuration, print the effective one (secrets
    /// redacted) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Start although another daemon's lease holds the stanza: only when
    /// that daemon's host is lost (two daemons would take every backup
    /// twice and fight over the slot). Without it the start is refused
    /// until that lease lapses, 15 minutes after its last refresh.
    #[arg(long)]
    pub take_over: bool,
    /// The daemon's settings (each also `[daemon]` of walvault.toml).
    #[command(flatten)]
    pub options: DaemonOptions,
    /// The budgets (else `[budgets]` of walvault.toml).
    #[command(flatten)]
    pub budgets: crate::ops::check::Budgets,
}

/// What replaces a secret in printed configuration.
const REDACTED: &str = "<redacted>";

/// A conninfo or URL with its password replaced.
fn redact_conninfo(s: &str) -> String {
    let mut out = Vec::new();
    for part in s.split_whitespace() {
        match part.split_once('=') {
            Some((k, _)) if k.trim() == "password" => out.push(format!("password={REDACTED}")),
            _ => out.push(part.to_owned()),
        }
    }
    redact_url(&out.join(" "))
}

/// `scheme://user:secret@host/…` → `scheme://user:<redacted>@host/…`;
/// for webhook URLs (Slack's carry their secret in the path) the path too.
fn redact_url(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_owned();
    };
    let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = match auth_host.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => format!("{auth}@{host}"),
        },
        None => auth_host.to_owned(),
    };
    if scheme.starts_with("http") && !path.is_empty() {
        format!("{scheme}://{host}/{REDACTED}")
    } else if path.is_empty() {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}/{path}")
    }
}

/// JSON nulls dropped (TOML has none).
fn strip_nulls(v: serde_json::Value) -> Option<serde_json::Value> {
    use serde_json::Value;
    match v {
        Value::Null => None,
        Value::Object(m) => Some(Value::Object(
            m.into_iter()
                .filter_map(|(k, v)| strip_nulls(v).map(|v| (k, v)))
                .collect(),
        )),
        Value::Array(a) => Some(Value::Array(
            a.into_iter().filter_map(strip_nulls).collect(),
        )),
        other => Some(other),
    }
}

/// The effective configuration as TOML, secrets redacted.
fn effective(
    settings: &Settings,
    pg: Option<&str>,
    options: &DaemonOptions,
    budgets: &crate::ops::check::Budgets,
) -> anyhow::Result<String> {
    let mut daemon = serde_json::to_value(options)?;
    if options.token.is_some() {
        daemon["token"] = REDACTED.into();
    }
    let mut alerts = serde_json::to_value(&settings.alerts)?;
    if let Some(list) = alerts.as_array_mut() {
        for a in list {
            for k in ["webhook", "slack"] {
                if let Some(u) = a.get(k).and_then(|u| u.as_str()).map(redact_url) {
                    a[k] = u.into();
                }
            }
        }
    }
    let repositories: Vec<serde_json::Value> = settings
        .repositories
        .iter()
        .map(|r| serde_json::json!({ "name": r.name, "repo": redact_url(&r.repo) }))
        .collect();
    let doc = serde_json::json!({
        "repo": settings.repo.as_deref().map(redact_url),
        "stanza": settings.stanza,
        "pg": pg.map(redact_conninfo),
        "budgets": budgets,
        "daemon": daemon,
        "alert": alerts,
        "repository": repositories,
    });
    let doc = strip_nulls(doc).unwrap_or_default();
    let value: toml::Value = toml::Value::try_from(doc)?;
    Ok(toml::to_string(&value)?)
}

pub(super) async fn run(
    settings: &Settings,
    args: DaemonArgs,
    global: &super::GlobalArgs,
) -> anyhow::Result<()> {
    if args.check_config {
        let Merged {
            options,
            budgets,
            plan,
            ..
        } = merged(settings, &args)?;
        let pg = args.pg.as_deref().or(settings.pg.as_deref());
        settings.repo()?;
        outln!("# walvault daemon: the configuration is valid; in effect (secrets redacted):")?;
        outln!(
            "{}",
            effective(settings, pg, &options, &budgets)?.trim_end()
        )?;
        for (kind, t) in &plan.triggers {
            outln!("# {} runs: {}", kind.name(), t.text())?;
        }
        return Ok(());
    }
    let mut current = prepare(settings, &args, None).await?;
    // the stanza's daemon lease, from the start to the exit (a reload
    // takes the new configuration's before it lets go of this one)
    let mut claim: Option<Lease> = None;
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping on signal");
        s.cancel();
    });
    // SIGHUP reads walvault.toml again (the command line's flags stay in
    // force over it, as at the start). A configuration that does not load,
    // or a repository or listen address that does not open, is reported
    // and the daemon goes on with the one it had. One that does: no new job
    // starts, the running ones end, then the daemon stops its stream and
    // starts again on the new configuration (the stream resumes where the
    // repository ends, as after any restart).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    let mut alerts = daemon::alerts::Alerter::default();
    loop {
        if let Some(old) = claim.replace(current.claim) {
            old.release().await;
        }
        let reload = tokio_util::sync::CancellationToken::new();
        let listen = current.plan.listen;
        let listener = current.listener.clone();
        let run = daemon::run(
            current.ctx,
            current.plan,
            current.listener,
            stop.child_token(),
            reload.clone(),
            alerts,
        );
        tokio::pin!(run);
        let mut reading: Option<tokio::task::JoinHandle<anyhow::Result<Prepared>>> = None;
        let mut next = None;
        loop {
            tokio::select! {
                carried = &mut run => {
                    alerts = carried;
                    break;
                }
                _ = hup.recv(), if reading.is_none() && next.is_none() => {
                    tracing::info!("SIGHUP: reading the configuration again");
                    let (global, args) = (global.clone(), args.clone());
                    let listening = (listen, listener.clone());
                    reading = Some(tokio::spawn(async move {
                        let settings = Settings::resolve(&global)?;
                        prepare(&settings, &args, Some(listening)).await
                    }));
                }
                r = async {
                    match reading.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if reading.is_some() => {
                    reading = None;
                    match r.map_err(anyhow::Error::new).and_then(|r| r) {
                        Ok(p) => {
                            tracing::info!("the configuration loaded: applying it");
                            next = Some(p);
                            reload.cancel();
                        }
                        Err(e) => tracing::error!(
                            "the configuration was not reloaded: {}; the daemon goes on with the one it had",
                            super::one_line(&e)
                        ),
                    }
                }
            }
        }
        match next {
            Some(p) if !stop.is_cancelled() => {
                current = p;
                tracing::info!("running on the reloaded configuration");
                super::set_log_level(current.log_level.as_deref());
            }
            _ => {
                if let Some(c) = claim.take() {
                    c.release().await;
                }
                if let Some(p) = next {
                    p.claim.release().await;
                }
                return Ok(());
            }
        }
    }
}

/// The flags over walvault.toml, validated.
struct Merged {
    options: DaemonOptions,
    budgets: crate::ops::check::Budgets,
    policy: Option<(crate::ops::retention::Policy, std::time::Duration)>,
    plan: daemon::Plan,
}

fn merged(settings: &Settings, args: &DaemonArgs) -> anyhow::Result<Merged> {
    let options = args.options.clone().or(settings.daemon.clone());
    let budgets = args.budgets.or(&settings.budgets);
    let policy = super::retention::PolicyArgs::default().resolve(&settings.retention)?;
    let plan = options.plan(policy.is_some()).map_err(anyhow::Error::new)?;
    Ok(Merged {
        options,
        budgets,
        policy,
        plan,
    })
}

/// What one start of the daemon runs on.
struct Prepared {
    ctx: daemon::Context,
    plan: daemon::Plan,
    listener: Arc<tokio::net::TcpListener>,
    /// The stanza's daemon lease ([`daemon::claim`]).
    claim: Lease,
    /// walvault.toml's `log_level`.
    log_level: Option<String>,
}

/// The daemon's context from `settings` and the command line; `listening`:
/// the address and listener a running daemon has (kept when the address
/// stays, else a new one is bound).
async fn prepare(
    settings: &Settings,
    args: &DaemonArgs,
    listening: Option<(std::net::SocketAddr, Arc<tokio::net::TcpListener>)>,
) -> anyhow::Result<Prepared> {
    let Merged {
        options,
        budgets,
        policy,
        plan,
    } = merged(settings, args)?;
    let params = ConnParams::parse(settings.pg(args.pg.as_deref())?)?;
    let when = if listening.is_none() { " at start" } else { "" };
    let listener = match listening {
        Some((addr, l)) if addr == plan.listen => l,
        _ => Arc::new(
            tokio::net::TcpListener::bind(plan.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (another daemon or program holds the port?): set another with --listen or [daemon] listen",
                        plan.listen
                    )
                })?,
        ),
    };
    let repo = Arc::new(settings.open_repository().await.with_context(|| {
        format!(
            "cannot open the repository {}{when}",
            settings.repo.as_deref().unwrap_or("")
        )
    })?);
    let slot = options.slot.clone().unwrap_or_else(|| "walvault".into());
    let stream = options.stream.unwrap_or(true).then(|| StreamOptions {
        slot: slot.clone(),
        partial_interval: options
            .partial_interval
            .unwrap_or(std::time::Duration::from_secs(1)),
        synchronous: options.synchronous.unwrap_or(false),
        ..StreamOptions::default()
    });
    let drill = match super::drill::options(settings, &super::drill::DrillArgs::default()) {
        Ok(d) => Some(d),
        Err(e) => {
            if plan
                .triggers
                .iter()
                .any(|(k, _)| *k == daemon::jobs::JobKind::Drill)
            {
                return Err(e.context("drills are scheduled but cannot run"));
            }
            None
        }
    };
    let file_sets: Vec<crate::files::backup::FilesBackupOptions> = settings
        .files
        .iter()
        .filter_map(|(set, c)| {
            Some(crate::files::backup::FilesBackupOptions {
                set: set.clone(),
                source: c.source.clone()?,
                s3: super::files::set_s3(settings, set),
                exclude: c.exclude.clone(),
                ..Default::default()
            })
        })
        .collect();
    if file_sets.is_empty()
        && plan
            .triggers
            .iter()
            .any(|(k, _)| *k == daemon::jobs::JobKind::Files)
    {
        anyhow::bail!(
            "daemon.schedule.files is set, but walvault.toml has no [files.<set>] with a source"
        );
    }
    let wanted = options.schedule.copy_to.clone();
    let mut copies = Vec::new();
    for r in &settings.repositories {
        if wanted.as_ref().is_some_and(|w| !w.contains(&r.name)) {
            continue;
        }
        let open_settings = Arc::new((r.clone(), settings.storage.clone()));
        let open: daemon::OpenRepository = Arc::new(move || {
            let s = open_settings.clone();
            Box::pin(async move {
                super::config::open_entry(&s.0, &s.1)
                    .await
                    .map_err(|e| super::one_line(&e))
            })
        });
        copies.push(CopyTarget {
            name: r.name.clone(),
            location: redact_url(&r.repo),
            open,
        });
    }
    if let Some(w) = &wanted {
        for name in w {
            settings.repository(name)?;
        }
    }
    let ctx = daemon::Context {
        repo,
        stanza: settings.stanza.clone(),
        params,
        stream,
        slot,
        backup: BaseBackupOptions {
            label: "walvault-daemon".into(),
            fast_checkpoint: options.fast.unwrap_or(false),
            max_rate: options
                .max_rate
                .as_deref()
                .map(super::init::parse_size)
                .transpose()
                .map_err(|e| anyhow::anyhow!("daemon.max_rate: {e}"))?,
            standby_max_lag: super::backup::parse_max_lag(
                options.standby_max_lag.as_deref().unwrap_or("1GiB"),
            )
            .map_err(|e| anyhow::anyhow!("daemon.standby_max_lag: {e}"))?
            .0,
            ..BaseBackupOptions::default()
        },
        expire: policy,
        drill,
        copies,
        budgets,
        deep_verify_sample: plan.deep_verify_sample,
        sinks: settings.alerts.clone(),
        file_sets,
    };
    // last: a configuration that fails above holds nothing
    let claim = daemon::claim::claim(ctx.repo.clone(), &ctx.stanza, args.take_over).await?;
    Ok(Prepared {
        ctx,
        plan,
        listener,
        claim,
        log_level: settings.log_level.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact_conninfo("host=db user=walvault password=hunter2 dbname=postgres"),
            "host=db user=walvault password=<redacted> dbname=postgres"
        );
        assert_eq!(
            redact_conninfo("postgres://walvault:hunter2@db:5432/postgres"),
            "postgres://walvault:<redacted>@db:5432/postgres"
        );
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T000/B000/XXXX"),
            "https://hooks.slack.com/<redacted>"
        );
        assert_eq!(redact_url("s3://bucket/prefix"), "s3://bucket/prefix");
    }
}
