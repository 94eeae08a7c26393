#!/usr/bin/env bash
# walvault files: backup and restore throughput of a local tree of mixed
# files (about 2 GiB by default: media-like incompressible files, text-like
# documents, many small files), a second run over the unchanged tree, and
# the peak RSS of a backup of a bucket of many small objects on Garage
# (issue 15). `tar | zstd -1` of the same tree, and its extraction, are
# measured beside it as yardsticks.
#
# usage: bench/files.sh
# env:   OBJECTS (objects in the bucket, default 100000), SCALE (tree size
#        multiplier, default 1 ≈ 2 GiB), ROUNDS (default 1),
#        WALVAULT_BIN (default: a release build), WALVAULT_GARAGE_BIN
#        (default: scripts/install-garage.sh), RESULTS_COPY (a file that
#        gets the raw results)
# Runs as root (walvault then runs as the postgres user) or as any user.
set -euo pipefail
OBJECTS=${OBJECTS:-100000}
SCALE=${SCALE:-1}
ROUNDS=${ROUNDS:-1}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null
command -v zstd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q zstd >/dev/null
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup files
run() { (cd "$tmp" && "${as[@]}" "$@"); }
results=$tmp/results
garage_pid=
cleanup() {
  if [ -n "$garage_pid" ]; then kill -TERM "$garage_pid" 2>/dev/null || true; wait "$garage_pid" 2>/dev/null || true; fi
  [ -s "${results:-}" ] && cp "$results" "${RESULTS_COPY:-/dev/null}"
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "# making the tree (scale $SCALE)" >&2
run python3 - "$tmp/tree" "$SCALE" "$OBJECTS" <<'PY'
import base64, os, sys
root, scale, objects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def put(rel, data):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
for s in range(scale):
    for i in range(4):                      # media: 4 x 200 MiB, incompressible
        put(f"s{s}/media/video-{i}.mp4", os.urandom(200 << 20))
    for i in range(1000):                   # documents: 1000 x 1 MiB, text-like
        put(f"s{s}/docs/{i % 50:02}/doc-{i:04}.txt", base64.b64encode(os.urandom(768 << 10)))
    for i in range(20000):                  # small: 20000 x 1-20 KiB
        put(f"s{s}/small/{i % 200:03}/f-{i:05}.json",
            b'{"id": %d, "v": "%s"}' % (i, b"x" * (1024 + (i * 37) % (19 << 10))))
# the bucket's objects, kept apart: OBJECTS x ~1 KiB
for i in range(objects):
    put(f"../objects/o/{i % 1000:03}/{i:06}.bin", os.urandom(512) + b"y" * 512)
PY
tree_bytes=$(du -sb "$tmp/tree" | cut -f1)
tree_files=$(find "$tmp/tree" -type f | wc -l)
echo "# tree: $tree_bytes bytes in $tree_files files" >&2

wv=("$tmp/walvault" -q --repo "$tmp/repo")
run "${wv[@]}" init >/dev/null
for r in $(seq "$ROUNDS"); do
  run rm -rf "$tmp/repo" "$tmp/out" "$tmp/tar.zst" "$tmp/untar"
  run "${wv[@]}" init >/dev/null
  measure files-backup "$tmp/repo" "${wv[@]}" files backup --set tree --source "$tmp/tree"
  measure files-backup-unchanged "$tmp/repo" "${wv[@]}" files backup --set tree --source "$tmp/tree"
  run sh -c "sync; echo 3 > /proc/sys/vm/drop_caches" 2>/dev/null || true
  measure files-restore "$tmp/out" "${wv[@]}" files restore --set tree --to "$tmp/out"
  measure tar-zstd1 "$tmp/tar.zst" sh -c "tar -C '$tmp/tree' -cf - . | zstd -1 -T2 -q -o '$tmp/tar.zst'"
  run rm -rf "$tmp/untar" && run mkdir "$tmp/untar"
  measure untar-zstd1 "$tmp/untar" sh -c "zstd -dc '$tmp/tar.zst' | tar -C '$tmp/untar' -xf - && sync -f '$tmp/untar'"
  echo "# round $r done" >&2
done

# a bucket of OBJECTS small objects on Garage: uploaded by a files restore
# of the object tree, then backed up (peak RSS: memory must not grow with
# the object count)
start_garage "$tmp/garage" uploads
cat >"$tmp/walvault.toml" <<EOF
repo = "$tmp/repo2"
[s3]
endpoint = "http://127.0.0.1:$s3_port"
region = "garage"
path_style = true
access_key_id = "$s3_key"
secret_access_key = "$s3_secret"
EOF
chmod 644 "$tmp/walvault.toml"
wv2=("$tmp/walvault" -q --config "$tmp/walvault.toml")
run "${wv2[@]}" init >/dev/null
run "${wv2[@]}" files backup --set objects --source "$tmp/objects" >/dev/null
for i in $(seq 120); do
  run "${wv2[@]}" files restore --set objects --to s3://uploads/ --parallel 32 >/dev/null 2>&1 && break
  [ "$i" -lt 120 ] || { tail -n 20 "$tmp/garage/garage.log" >&2; echo "Garage did not come up" >&2; exit 1; }
  sleep 0.5
done
measure bucket-backup "$tmp/repo2" "${wv2[@]}" files backup --set bucket --source s3://uploads/ --parallel 16
measure bucket-backup-unchanged "$tmp/repo2" "${wv2[@]}" files backup --set bucket --source s3://uploads/ --parallel 16

python3 - "$results" "$tree_bytes" "$tree_files" "$OBJECTS" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    name, wall, cpu, rss, added = line.split()[:5]
    rows.setdefault(name, []).append((float(wall), float(cpu), int(rss), int(added)))
tree, files, objects = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
med = lambda name, i: statistics.median(r[i] for r in rows[name])
print(f"tree: {tree / 2**30:.2f} GiB in {files} files; bucket: {objects} objects")
print(f"{'operation':<26}{'wall s':>8}{'rate':>14}{'CPU s':>8}{'peak RSS MiB':>14}{'stored MiB':>12}")
for name in rows:
    wall = med(name, 0)
    rate = f"{objects / wall:.0f} obj/s" if name.startswith("bucket") else f"{tree / wall / 1e6:.0f} MB/s"
    print(f"{name:<26}{wall:>8.2f}{rate:>14}{med(name, 1):>8.2f}{med(name, 2) / 1024:>14.0f}{med(name, 3) / 2**20:>12.1f}")
print(f"backup / tar|zstd-1 wall: {med('files-backup', 0) / med('tar-zstd1', 0):.2f}x;"
      f" stored: {med('files-backup', 3) / med('tar-zstd1', 3):.2f}x;"
      f" restore / zstd -d|tar -x wall: {med('files-restore', 0) / med('untar-zstd1', 0):.2f}x")
PY
