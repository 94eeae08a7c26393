//! What walvault writes to standard error as a person or a log collector
//! sees it: ANSI colours only on a terminal, never with `NO_COLOR`, never in
//! a file or a pipe (`scripts/demo > file` wrote escape sequences once).

use std::process::Command;

use crate::support::Walvault;

/// `walvault ARGS` with stderr on a pipe, or on a pseudo-terminal through
/// `script(1)` (util-linux); returns what stderr (for `script`, the
/// terminal) received.
fn stderr_of(args: &[&str], tty: bool, no_color: Option<&str>) -> String {
    let mut cmd = if tty {
        let line = std::iter::once(Walvault::bin().display().to_string())
            .chain(args.iter().map(|a| format!("'{a}'")))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"]);
        c
    } else {
        Walvault::new().args(args).command()
    };
    cmd.env_remove("WALVAULT_REPO").env_remove("NO_COLOR");
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // script copies the terminal to its stdout
    let text = if tty { out.stdout } else { out.stderr };
    String::from_utf8_lossy(&text).into_owned()
}

#[test]
fn log_lines_are_coloured_only_on_a_terminal_without_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    let history = dir.path().join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    let history = history.to_str().unwrap();
    Walvault::new().args(["init", "--repo", repo]).ok();
    // a second push of the same file logs at info level that it is there
    let push = ["wal-push", history, "--repo", repo];
    stderr_of(&push, false, None);

    let piped = stderr_of(&push, false, None);
    assert!(
        piped.contains("already"),
        "no log line to look at: {piped:?}"
    );
    assert!(
        !piped.contains('\u{1b}'),
        "escape sequences in a pipe: {piped:?}"
    );

    let tty = stderr_of(&push, true, None);
    assert!(tty.contains("already"), "{tty:?}");
    assert!(tty.contains("\u{1b}["), "no colours on a terminal: {tty:?}");

    let no_color = stderr_of(&push, true, Some("1"));
    assert!(no_color.contains("already"), "{no_color:?}");
    assert!(
        !no_color.contains('\u{1b}'),
        "colours despite NO_COLOR: {no_color:?}"
    );
}
