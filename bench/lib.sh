# Shared setup of the bench scripts (sourced, not run): checks that PG_BIN
# holds the programs named, builds walvault unless WALVAULT_BIN is given, and
# makes a work directory `$tmp` (named walvault-NAME.*) that the database's OS
# user can use, with a copy of the binary in it. Sets `tmp`, `as` (the
# command prefix that runs a program as that user: runuser when root) and
# `WALVAULT_BIN`. Needs `root` (the repository) and `PG_BIN` set.
#
# usage: bench_setup NAME PROGRAM...
bench_setup() {
  local name=$1 p
  shift
  for p in "$@"; do
    [ -x "$PG_BIN/$p" ] || { echo "$PG_BIN/$p not found (scripts/install-deps.sh)" >&2; exit 1; }
  done
  if [ -z "${WALVAULT_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q)
    WALVAULT_BIN=$root/target/release/walvault
  fi
  tmp=$(mktemp -d -t "walvault-$name.XXXXXX")
  chmod 755 "$tmp"
  as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$tmp"
    as=(runuser -u postgres --)
  fi
  cp "$WALVAULT_BIN" "$tmp/walvault"
  chmod 755 "$tmp/walvault"
}

# measure NAME PATH CMD...: run CMD (through `run`, which each script
# defines) under GNU time, after a sync (every operation starts on a quiet
# file system: no writeback or journal commit left over from the previous
# one), and append "NAME wall cpu rss_kib bytes_added_under_PATH [extra]"
# to $results; extra is what a function `measure_extra NAME` prints, when
# the script defines one. CMD's output is in $tmp/cmd.log.
measure() {
  local name=$1 sized=$2
  shift 2
  sync
  local before=0
  [ -e "$sized" ] && before=$(du -sb "$sized" | cut -f1)
  run /usr/bin/time -f "%e %U %S %M" -o "$tmp/time.txt" "$@" >"$tmp/cmd.log" 2>&1 || {
    echo "FAILED: $name: $*" >&2
    cat "$tmp/cmd.log" >&2
    exit 1
  }
  local after=0
  [ -e "$sized" ] && after=$(du -sb "$sized" | cut -f1)
  local wall user sys rss extra=""
  read -r wall user sys rss <"$tmp/time.txt"
  if declare -F measure_extra >/dev/null; then extra=" $(measure_extra "$name")"; fi
  echo "$name $wall $(python3 -c "print($user+$sys)") $rss $((after - before))$extra" >>"$results"
  echo "#   $name: ${wall}s" >&2
}

# wait_durable STATUS_FILE LSN SECONDS: wait until a `walvault stream`
# status file says LSN is durable in the repository (or SECONDS pass).
wait_durable() {
  local status=$1 end=$2 secs=$3 d i
  for i in $(seq $((secs * 5))); do
    d=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['durable_lsn'])" "$status" 2>/dev/null || echo 0/0)
    python3 - "$d" "$end" <<'PY' && return 0
import sys
f = lambda s: (int(s.split('/')[0], 16) << 32) + int(s.split('/')[1], 16)
sys.exit(0 if f(sys.argv[1]) >= f(sys.argv[2]) else 1)
PY
    sleep 0.2
  done
  : "$i"
}

# start_garage DIR BUCKET: a single-node Garage on free 127.0.0.1 ports
# with its data in DIR and one bucket, in the background. Sets
# `garage_pid` (stop it in the script's cleanup), `s3_port`, `s3_key` and
# `s3_secret`. The binary: WALVAULT_GARAGE_BIN, else
# scripts/install-garage.sh. Returns at once: the first requests may fail
# while the node starts (retry them).
start_garage() {
  local dir=$1 bucket=$2 garage rpc_port admin_port
  garage=${WALVAULT_GARAGE_BIN:-$("$root/scripts/install-garage.sh" | tail -n 1)}
  _free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  _hex() { python3 -c "import secrets; print(secrets.token_hex($1))"; }
  s3_port=$(_free_port); rpc_port=$(_free_port); admin_port=$(_free_port)
  s3_key=GK$(_hex 12); s3_secret=$(_hex 32)
  mkdir -p "$dir/meta" "$dir/data"
  cat >"$dir/garage.toml" <<GARAGE
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
[admin]
api_bind_addr = "127.0.0.1:$admin_port"
GARAGE
  chmod 600 "$dir/garage.toml"
  env GARAGE_RPC_SECRET="$(_hex 32)" GARAGE_ADMIN_TOKEN="$(_hex 16)" \
    GARAGE_DEFAULT_ACCESS_KEY="$s3_key" GARAGE_DEFAULT_SECRET_KEY="$s3_secret" \
    GARAGE_DEFAULT_BUCKET="$bucket" RUST_LOG=warn \
    "$garage" -c "$dir/garage.toml" server --single-node --default-bucket \
    </dev/null >"$dir/garage.log" 2>&1 &
  garage_pid=$!
}

# garage_config FILE BUCKET: a walvault configuration for a repository in
# the bucket of the Garage start_garage started (prefix "bench").
garage_config() {
  cat >"$1" <<EOF
repo = "s3://$2/bench"
[s3]
endpoint = "http://127.0.0.1:$s3_port"
region = "garage"
path_style = true
EOF
  chmod 644 "$1"
}

# garage_retry DIR COMMAND...: run COMMAND until it succeeds while the
# Garage in DIR starts (60 s), else print its log and exit.
garage_retry() {
  local dir=$1 i
  shift
  for i in $(seq 120); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  tail -n 20 "$dir/garage.log" >&2
  echo "Garage did not come up" >&2
  exit 1
}
