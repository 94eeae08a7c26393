//! The deployment files agree: docker-compose.yml, `scripts/sidecar-local`
//! (the same three services as local processes, for machines without
//! Docker) and deploy/walvault.toml, which the daemon's `--check-config`
//! accepts with the compose service's command and environment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_yaml::Value;

/// The three services of the topology.
const SERVICES: [&str; 3] = ["postgres", "garage", "walvault"];

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let path = repo_root().join("docker-compose.yml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn services(compose: &Value) -> &serde_yaml::Mapping {
    compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has a services mapping")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    services(compose)
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
}

/// A scalar as text (ports and environment values may be numbers).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

/// The host ports a service publishes: the left side of `HOST:CONTAINER`
/// (`IP:HOST:CONTAINER`, `/tcp` allowed), or `published` of the long
/// syntax; `CONTAINER` alone publishes nothing fixed.
fn published_ports(service: &Value) -> BTreeSet<u16> {
    let Some(ports) = service.get("ports") else {
        return BTreeSet::new();
    };
    let ports = ports.as_sequence().expect("ports is a list");
    let mut out = BTreeSet::new();
    for p in ports {
        let host = match p {
            Value::Mapping(m) => m.get("published").map(text),
            other => {
                let s = text(other);
                // the container side, then what is left: [IP:]HOST
                s.rsplit_once(':').map(|(left, _container)| {
                    left.rsplit_once(':')
                        .map_or(left, |(_ip, host)| host)
                        .to_owned()
                })
            }
        };
        if let Some(h) = host {
            out.insert(
                h.parse()
                    .unwrap_or_else(|_| panic!("published port {h:?} of {p:?} is not a port")),
            );
        }
    }
    out
}

/// `${NAME:-default}`, `${NAME-default}` and `${NAME}` as compose reads
/// them when NAME is not set (what the test assumes), other values as they
/// are.
fn interpolated(value: &str) -> String {
    let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) else {
        return value.to_owned();
    };
    if let Some((_, default)) = inner.split_once(":-") {
        return default.to_owned();
    }
    if let Some((_, default)) = inner.split_once('-') {
        return default.to_owned();
    }
    String::new()
}

/// A service's environment, name → value (the map and the list syntax).
fn environment(service: &Value) -> BTreeMap<String, String> {
    let Some(env) = service.get("environment") else {
        return BTreeMap::new();
    };
    match env {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| (text(k), interpolated(&text(v))))
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let s = text(item);
                match s.split_once('=') {
                    Some((k, v)) => (k.to_owned(), interpolated(v)),
                    None => (s, String::new()),
                }
            })
            .collect(),
        other => panic!("environment is neither a map nor a list: {other:?}"),
    }
}

/// A service's command as arguments (the list or the string syntax).
fn command(service: &Value) -> Vec<String> {
    match service.get("command") {
        Some(Value::Sequence(args)) => args.iter().map(text).collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        other => panic!("no command, or not a list or a string: {other:?}"),
    }
}

/// What `scripts/sidecar-local --print-topology` prints: each service's
/// ports and the names of the daemon's environment.
struct Topology {
    ports: BTreeMap<String, BTreeSet<u16>>,
    env: BTreeSet<String>,
}

fn sidecar_local_topology() -> Topology {
    let script = repo_root().join("scripts/sidecar-local");
    let mut cmd = Command::new(&script);
    cmd.arg("--print-topology").current_dir(repo_root());
    // the defaults, which are compose's ports
    for var in [
        "WALVAULT_SIDECAR_PG_PORT",
        "WALVAULT_SIDECAR_S3_PORT",
        "WALVAULT_SIDECAR_ADMIN_PORT",
        "WALVAULT_SIDECAR_RPC_PORT",
        "WALVAULT_SIDECAR_LISTEN",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} --print-topology: {}\n{stdout}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut topology = Topology {
        ports: BTreeMap::new(),
        env: BTreeSet::new(),
    };
    for line in stdout.lines() {
        let fields: BTreeMap<&str, &str> = line
            .split_whitespace()
            .map(|f| {
                f.split_once('=')
                    .unwrap_or_else(|| panic!("not KEY=VALUE: {f:?} in {line:?}"))
            })
            .collect();
        match (fields.get("service"), fields.get("port"), fields.get("env")) {
            (Some(s), Some(p), None) if fields.len() == 2 => {
                let port = p.parse().unwrap_or_else(|_| panic!("not a port: {line:?}"));
                topology
                    .ports
                    .entry((*s).to_owned())
                    .or_default()
                    .insert(port);
            }
            (None, None, Some(name)) if fields.len() == 1 => {
                assert!(
                    topology.env.insert((*name).to_owned()),
                    "{name} printed twice"
                );
            }
            _ => panic!("unexpected line in --print-topology: {line:?}\n{stdout}"),
        }
    }
    topology
}

#[test]
fn compose_and_sidecar_local_start_the_same_services_on_the_same_ports() {
    let compose = compose();
    let names: BTreeSet<String> = services(&compose).keys().map(text).collect();
    let expected: BTreeSet<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(names, expected, "the services of docker-compose.yml");

    let topology = sidecar_local_topology();
    let local: BTreeSet<&String> = topology.ports.keys().collect();
    assert_eq!(
        local,
        expected.iter().collect::<BTreeSet<_>>(),
        "the services of scripts/sidecar-local --print-topology"
    );
    for name in SERVICES {
        let published = published_ports(service(&compose, name));
        assert!(!published.is_empty(), "compose's {name} publishes no port");
        assert_eq!(
            topology.ports.get(name),
            Some(&published),
            "{name}: scripts/sidecar-local's ports against the published ports of docker-compose.yml"
        );
    }
}

#[test]
fn compose_and_sidecar_local_give_the_daemon_the_same_environment() {
    let compose = compose();
    let in_compose: BTreeSet<String> = environment(service(&compose, "walvault"))
        .into_keys()
        .collect();
    let local = sidecar_local_topology().env;
    let only_compose: Vec<&String> = in_compose.difference(&local).collect();
    let only_local: Vec<&String> = local.difference(&in_compose).collect();
    assert!(
        only_compose.is_empty() && only_local.is_empty(),
        "the walvault service's environment differs: only in docker-compose.yml {only_compose:?}, only in scripts/sidecar-local {only_local:?}"
    );
    for name in ["WALVAULT_CONFIG", "WALVAULT_PG"] {
        assert!(in_compose.contains(name), "{name} missing: {in_compose:?}");
    }
}

#[test]
fn compose_runs_the_daemon_after_postgres_and_garage() {
    let compose = compose();
    let walvault = service(&compose, "walvault");
    let args = command(walvault);
    assert!(
        args.iter().any(|a| a == "daemon"),
        "the walvault service's command {args:?} does not run the daemon"
    );
    let depends: BTreeSet<String> = match walvault.get("depends_on") {
        Some(Value::Sequence(s)) => s.iter().map(text).collect(),
        Some(Value::Mapping(m)) => m.keys().map(text).collect(),
        other => panic!("the walvault service's depends_on: {other:?}"),
    };
    for name in ["postgres", "garage"] {
        assert!(
            depends.contains(name),
            "walvault does not depend on {name}: {depends:?}"
        );
    }
    let config = environment(walvault)
        .remove("WALVAULT_CONFIG")
        .expect("WALVAULT_CONFIG");
    let volumes: Vec<String> = walvault
        .get("volumes")
        .and_then(Value::as_sequence)
        .map(|v| v.iter().map(text).collect())
        .unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v.starts_with("./deploy/walvault.toml:") && v.contains(&config)),
        "deploy/walvault.toml is not mounted at WALVAULT_CONFIG={config}: {volumes:?}"
    );
}

/// `walvault daemon --check-config` with the compose service's command and
/// environment accepts deploy/walvault.toml, prints the schedules, and none
/// of the secrets the environment holds.
#[test]
fn the_compose_config_passes_check_config_without_printing_secrets() {
    let compose = compose();
    let walvault = service(&compose, "walvault");
    let mut env = environment(walvault);
    // the path inside the container; the file is given with --config here
    env.remove("WALVAULT_CONFIG");
    let secrets: Vec<(String, String)> = env
        .iter()
        .filter(|(k, v)| {
            ["PASSWORD", "PASSPHRASE", "SECRET", "TOKEN"]
                .iter()
                .any(|s| k.contains(s))
                && !v.is_empty()
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(
        secrets.iter().any(|(k, _)| k == "WALVAULT_TOKEN"),
        "no WALVAULT_TOKEN to keep secret: {secrets:?}"
    );

    let mut args = command(walvault);
    args.extend(["--check-config", "--config", "deploy/walvault.toml"].map(str::to_owned));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walvault"));
    cmd.args(&args)
        .current_dir(repo_root())
        .env_clear()
        .envs(env);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("run walvault");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walvault {args:?}: {}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        out.status
    );
    for expected in [
        "0 2 * * *",
        "after-backup",
        "30 3 * * *",
        "0 4 * * 0",
        "0 5 * * 0",
        "0.0.0.0:9187",
        "s3://walvault/main",
    ] {
        assert!(
            stdout.contains(expected),
            "the effective config lacks {expected:?}:\n{stdout}"
        );
    }
    for (name, value) in &secrets {
        assert!(
            !stdout.contains(value.as_str()) && !stderr.contains(value.as_str()),
            "walvault {args:?} printed the value of {name}:\n{stdout}{stderr}"
        );
    }
}
