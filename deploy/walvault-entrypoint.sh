#!/usr/bin/env bash
# Entrypoint of the walvault service of docker-compose.yml (in the image as
# /usr/local/bin/walvault-entrypoint), also run by scripts/sidecar-local:
#
#   walvault-entrypoint [GLOBAL OPTIONS] daemon [FLAGS]
#                                          create the repository when it does
#                                          not exist yet, then run the daemon
#   walvault-entrypoint COMMAND [ARGS]     any other walvault command, as is
#
# 1. A passphrase in WALVAULT_PASSPHRASE is moved into a private file named
#    by WALVAULT_PASSPHRASE_FILE: a drill's recovered server runs
#    `walvault wal-fetch` by itself, and takes the passphrase from a file,
#    never from the environment.
# 2. For `daemon`: `walvault init` (with --encrypt when a passphrase or key
#    file is given) until the store answers, for up to
#    WALVAULT_INIT_TIMEOUT seconds (default 120): a repository that is
#    already there is left as it is; a location holding anything else stops
#    here.
# 3. exec walvault with the arguments.
#
# The repository and everything else come from walvault.toml (WALVAULT_CONFIG)
# and the environment (WALVAULT_PG, AWS_ACCESS_KEY_ID, ...).
set -euo pipefail

if [ -n "${WALVAULT_PASSPHRASE:-}" ] && [ -z "${WALVAULT_PASSPHRASE_FILE:-}" ] && [ -z "${WALVAULT_KEY_FILE:-}" ]; then
  secrets=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/walvault-secrets.XXXXXX")
  (umask 077 && printf '%s' "$WALVAULT_PASSPHRASE" > "$secrets/passphrase")
  export WALVAULT_PASSPHRASE_FILE=$secrets/passphrase
fi
unset WALVAULT_PASSPHRASE

# the daemon's run (not --check-config, not --help), and the global options
# given before `daemon`, which init takes too
run_daemon=false
globals=()
for a in "$@"; do
  case $a in
    daemon) run_daemon=true ;;
    --check-config | --help | -h | --version | -V) run_daemon=false; break ;;
    *) $run_daemon || globals+=("$a") ;;
  esac
done

if $run_daemon; then
  init=("${globals[@]}" init)
  encrypt=false
  if [ -n "${WALVAULT_PASSPHRASE_FILE:-}" ] || [ -n "${WALVAULT_KEY_FILE:-}" ]; then encrypt=true; fi
  for a in "${globals[@]}"; do
    case $a in --passphrase-file* | --key-file*) encrypt=true ;; esac
  done
  if $encrypt; then init+=(--encrypt); fi
  deadline=$(( SECONDS + ${WALVAULT_INIT_TIMEOUT:-120} ))
  while :; do
    if out=$(walvault "${init[@]}" 2>&1); then
      printf '%s\n' "$out"
      break
    fi
    case $out in
      *"a walvault repository is already there"*)
        echo "walvault-entrypoint: the repository exists"
        break ;;
      *"is not empty"* | *"passphrase"* | *"key file"* | *"config file"* | *"no repository given"*)
        # nothing a retry changes
        printf '%s\n' "$out" >&2
        exit 1 ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
      printf '%s\n' "$out" >&2
      echo "walvault-entrypoint: the repository's store did not answer within ${WALVAULT_INIT_TIMEOUT:-120} s" >&2
      exit 1
    fi
    echo "walvault-entrypoint: waiting for the repository's store: $(printf '%s\n' "$out" | tail -n 1)" >&2
    sleep 3
  done
fi

exec walvault "$@"
