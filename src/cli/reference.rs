//! docs/configuration.md, generated from the structs that parse
//! walvault.toml (their doc comments, through a JSON schema) and the clap
//! definitions of the flags that set the same keys: the reference is not
//! written twice by hand. The test fails when the file is stale;
//! `WALVAULT_UPDATE_DOCS=1 cargo test --lib config_reference` rewrites it.

use std::collections::BTreeMap;
use std::fmt::Write;

use clap::{Args, CommandFactory};
use serde_json::Value;

/// (table, key) → the flag and environment variable that set it too, and
/// the flag's help.
fn flags() -> BTreeMap<(String, String), (String, String)> {
    let mut out = BTreeMap::new();
    let mut add = |table: &str, cmd: clap::Command, kebab_keys: bool| {
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            let id = a.get_id().as_str();
            let key = if kebab_keys {
                id.replace('_', "-")
            } else {
                id.to_owned()
            };
            let env = a
                .get_env()
                .map(|e| format!(", `{}`", e.to_string_lossy()))
                .unwrap_or_default();
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            out.insert((table.to_owned(), key), (format!("`--{long}`{env}"), help));
        }
    };
    let mut cli = super::Cli::command();
    cli.build();
    let daemon = cli
        .find_subcommand("daemon")
        .cloned()
        .unwrap_or_else(|| clap::Command::new("daemon"));
    // the global options and `pg`, at the top level
    add("", daemon.clone(), false);
    add(
        "daemon.schedule",
        crate::daemon::Schedules::augment_args(clap::Command::new("x")),
        false,
    );
    let schedule_ids: Vec<String> = crate::daemon::Schedules::augment_args(clap::Command::new("x"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    let mut d = BTreeMap::new();
    for a in crate::daemon::DaemonOptions::augment_args(clap::Command::new("x")).get_arguments() {
        if !schedule_ids.contains(&a.get_id().to_string()) {
            d.insert(a.get_id().to_string(), a.clone());
        }
    }
    add(
        "daemon",
        clap::Command::new("x").args(d.into_values()),
        false,
    );
    add(
        "budgets",
        crate::ops::check::Budgets::augment_args(clap::Command::new("x")),
        false,
    );
    add(
        "retention",
        super::retention::PolicyArgs::augment_args(clap::Command::new("x")),
        true,
    );
    add(
        "drill",
        super::drill::DrillArgs::augment_args(clap::Command::new("x")),
        true,
    );
    out
}

/// The schema of `v`, following `$ref` and `Option`'s `anyOf [X, null]`.
fn resolve<'a>(root: &'a Value, v: &'a Value) -> &'a Value {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return resolve(root, &root["$defs"][name]);
    }
    if let Some(any) = v.get("anyOf").and_then(Value::as_array) {
        if let Some(x) = any
            .iter()
            .find(|x| x.get("type") != Some(&Value::from("null")))
        {
            return resolve(root, x);
        }
    }
    v
}

fn type_name(root: &Value, v: &Value) -> String {
    let r = resolve(root, v);
    if r.get("enum").is_some() || r.get("oneOf").is_some() {
        let vals: Vec<String> = r["enum"]
            .as_array()
            .cloned()
            .or_else(|| {
                r["oneOf"].as_array().map(|o| {
                    o.iter()
                        .filter_map(|x| {
                            x.get("const")
                                .or_else(|| x.get("enum").and_then(|e| e.get(0)))
                                .cloned()
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
            .iter()
            .map(|x| format!("`{}`", x.as_str().unwrap_or_default()))
            .collect();
        return vals.join(" \\| ");
    }
    match &r["type"] {
        Value::String(t) if t == "array" => format!("array of {}", type_name(root, &r["items"])),
        Value::String(t) if t == "object" => {
            if r.get("properties").is_some() {
                "table".into()
            } else {
                "table of strings".into()
            }
        }
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "value".into(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn table(
    out: &mut String,
    root: &Value,
    schema: &Value,
    path: &str,
    array: bool,
    flags: &BTreeMap<(String, String), (String, String)>,
) {
    let s = resolve(root, schema);
    let Some(props) = s.get("properties").and_then(Value::as_object) else {
        return;
    };
    if !path.is_empty() {
        let head = if array {
            format!("[[{path}]]")
        } else {
            format!("[{path}]")
        };
        let _ = writeln!(out, "\n## `{head}`\n");
        if let Some(d) = s.get("description").and_then(Value::as_str) {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
    }
    let _ = writeln!(
        out,
        "| key | type | flag, environment | meaning |\n|---|---|---|---|"
    );
    let mut nested = Vec::new();
    for (k, v) in props {
        let r = resolve(root, v);
        let is_table = r.get("properties").is_some();
        let items = r.get("items").map(|i| resolve(root, i));
        let is_array_of_tables = items.is_some_and(|i| i.get("properties").is_some());
        let sub = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let desc = v
            .get("description")
            .or_else(|| r.get("description"))
            .and_then(Value::as_str)
            .map(one_line)
            .unwrap_or_default();
        // a map of tables by name: `[files.<name>]`
        if let Some(each) = r
            .get("additionalProperties")
            .filter(|a| resolve(root, a).get("properties").is_some())
        {
            let _ = writeln!(
                out,
                "| `{k}` | tables, one per name | | {desc} (see `[{sub}.<name>]`) |"
            );
            nested.push((format!("{sub}.<name>"), each.clone(), false));
            continue;
        }
        if is_table || is_array_of_tables {
            let where_ = if is_array_of_tables {
                format!("[[{sub}]]")
            } else {
                format!("[{sub}]")
            };
            let _ = writeln!(out, "| `{k}` | table | | {desc} (see `{where_}`) |");
            nested.push((sub, v.clone(), is_array_of_tables));
            continue;
        }
        let (flag, help) = flags
            .get(&(path.to_owned(), k.clone()))
            .cloned()
            .unwrap_or_default();
        // a key documented only as "`--flag`." reads the flag's help
        let desc = if desc.starts_with("`--") && desc.len() < 40 && !help.is_empty() {
            one_line(&help)
        } else {
            desc
        };
        let default = v
            .get("default")
            .filter(|d| !d.is_null())
            .map(|d| format!(" Default: `{d}`."))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| `{k}` | {} | {flag} | {desc}{default} |",
            type_name(root, v)
        );
    }
    for (sub, v, arr) in nested {
        let schema = if arr {
            resolve(root, &v)["items"].clone()
        } else {
            v
        };
        table(out, root, &schema, &sub, arr, flags);
    }
}

/// The reference as Markdown.
pub fn reference() -> String {
    let root = serde_json::to_value(schemars::schema_for!(super::Config)).unwrap_or_default();
    let mut out = String::from(
        "# walvault.toml reference\n\n\
         Generated from the structs that read the file and the flags that set the same \
         keys (`src/cli/reference.rs`); do not edit by hand: \
         `WALVAULT_UPDATE_DOCS=1 cargo test --lib config_reference` rewrites it. \
         Precedence: command line, then environment, then this file, then the defaults. \
         Durations are text such as `90s`, `15m`, `26h`, `7d`; cron expressions have five \
         fields, or six with seconds first. An unknown key or a value that cannot work is \
         an error that names its line. `walvault daemon --check-config` prints the \
         configuration in effect with secrets redacted.\n\n## Top level\n\n",
    );
    table(&mut out, &root, &root, "", false, &flags());
    out
}

#[test]
fn config_reference() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let want = reference();
    if std::env::var_os("WALVAULT_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/configuration.md is stale: run WALVAULT_UPDATE_DOCS=1 cargo test --lib config_reference"
    );
}
