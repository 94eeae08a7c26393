#!/usr/bin/env python3
"""Block-size study for walvault's content-addressed repository.

Given two copies of a PostgreSQL data directory (``--before`` and ``--after``,
each taken from a cleanly stopped server), this script models how walvault
would back them up for each candidate block size B and prints, per B:

* blocks      -- number of blocks in ``before`` (every file is cut at
                 offsets 0, B, 2B, ...; a file smaller than B is one block;
                 the last block of a file may be short)
* distinct    -- distinct block ids (SHA-256 of the block's bytes) in ``before``
* stored      -- sum of the lengths of those distinct blocks (what the first
                 backup uploads, before compression)
* new blocks  -- distinct blocks of ``after`` whose id is not in ``before``
* new bytes   -- sum of their lengths (what the second backup uploads, before
                 compression), also as % of the ``after`` data directory size
* zlib-1      -- (with ``--zlib``) zlib level 1 compressed size of the new
                 blocks, each block compressed on its own; a stdlib stand-in
                 for walvault's per-block LZ4/zstd compression
* index       -- distinct blocks in before u after x 56 bytes (in-memory index)
* manifest    -- blocks in ``after`` x 32 bytes (one id per file block)

Files are selected the way a base backup selects them: ``pg_wal/`` and the
other directories whose contents pg_basebackup skips, ``postmaster.pid``,
``postmaster.opts`` and friends are left out.  Symlinks under ``pg_tblspc``
are followed, as a base backup includes tablespaces.

Only the Python standard library is used.  Each file is read once per data
directory; every block size is hashed from the same buffer.

Example:

    python3 bench/block_size_study.py --before /tmp/bss/before \\
        --after /tmp/bss/after_a --zlib
"""

import argparse
import hashlib
import math
import os
import subprocess
import sys
import time
import zlib

PAGE = 8192
DEFAULT_SIZES = "8K 16K 32K 64K 128K 256K 512K 1M"
INDEX_BYTES_PER_BLOCK = 56
MANIFEST_BYTES_PER_BLOCK = 32

# What pg_basebackup leaves out (src/backend/backup/basebackup.c, PG 15).
# Directories whose *contents* are skipped (the directory itself would be
# recreated empty, which costs no blocks).
EXCLUDE_DIR_CONTENTS = {
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
}
# Top-level files that are skipped.
EXCLUDE_FILES = {
    "postmaster.pid",
    "postmaster.opts",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
}
# Skipped anywhere in the tree.
EXCLUDE_PREFIXES_ANYWHERE = ("pg_internal.init", "pgsql_tmp")


def parse_size(text):
    t = text.strip().upper()
    mult = 1
    for suffix, m in (("KIB", 1024), ("MIB", 1 << 20), ("KB", 1024), ("MB", 1 << 20),
                      ("K", 1024), ("M", 1 << 20)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    value = int(t) * mult
    if value <= 0 or value % PAGE:
        raise argparse.ArgumentTypeError(
            f"block size {text!r} is not a positive multiple of {PAGE}")
    return value


def human(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def label(size):
    if size % (1 << 20) == 0:
        return f"{size >> 20}M"
    return f"{size >> 10}K"


def iter_files(root):
    """Yield (relative path, absolute path) of every file a base backup takes,
    in a stable order."""
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = os.path.relpath(dirpath, root)
        top = rel_dir == "."
        if top:
            # Contents of excluded directories are not walked at all.
            dirnames[:] = [d for d in dirnames if d not in EXCLUDE_DIR_CONTENTS]
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(EXCLUDE_PREFIXES_ANYWHERE))
        for name in sorted(filenames):
            if top and name in EXCLUDE_FILES:
                continue
            if name.startswith(EXCLUDE_PREFIXES_ANYWHERE):
                continue
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):
                continue
            yield (name if top else os.path.join(rel_dir, name)), full


class Stats:
    """Per block size counters for one data directory."""

    def __init__(self):
        self.blocks = 0          # all file blocks
        self.ids = set()         # distinct ids seen in this directory
        self.distinct_bytes = 0  # sum of lengths of distinct blocks
        self.new_ids = 0         # distinct ids not in the reference set
        self.new_bytes = 0
        self.new_zlib = 0


def scan(root, sizes, reference=None, want_zlib=False):
    """Cut every file of ``root`` into blocks for each size.

    Returns (stats by size, total bytes, file count).  When ``reference``
    (a dict size -> set of ids) is given, blocks whose id is absent from it are
    counted as new (once per distinct id)."""
    chunk = 1
    for s in sizes:
        chunk = chunk * s // math.gcd(chunk, s)
    # Read at least 1 MiB at a time; lcm of powers of two is the largest size.
    chunk = max(chunk, 1 << 20)
    if chunk > (64 << 20):
        raise SystemExit("block sizes have a least common multiple above 64 MiB; "
                         "choose sizes that divide each other")
    stats = {s: Stats() for s in sizes}
    total = 0
    files = 0
    for _rel, path in iter_files(root):
        files += 1
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f:
            while True:
                buf = f.read(chunk)
                if not buf:
                    break
                total += len(buf)
                mv = memoryview(buf)
                n = len(buf)
                for s in sizes:
                    st = stats[s]
                    ids = st.ids
                    ref = reference[s] if reference is not None else None
                    for off in range(0, n, s):
                        block = mv[off:off + s]
                        digest = hashlib.sha256(block).digest()
                        st.blocks += 1
                        if digest in ids:
                            continue
                        ids.add(digest)
                        st.distinct_bytes += len(block)
                        if ref is not None and digest not in ref:
                            st.new_ids += 1
                            st.new_bytes += len(block)
                            if want_zlib:
                                st.new_zlib += len(zlib.compress(block, 1))
                # A file shorter than the chunk (or its tail) ends here; the
                # next read returns b"".
    return stats, total, files


def describe_machine():
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            models = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if models:
            lines.append(f"cpu: {models[0]} x {len(models)}")
    except OSError:
        pass
    try:
        out = subprocess.run(["uname", "-srm"], capture_output=True, text=True, check=False)
        lines.append(f"kernel: {out.stdout.strip()}")
    except OSError:
        pass
    lines.append(f"python: {sys.version.split()[0]}, {hashlib.sha256().name} via hashlib")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="data directory of the first backup")
    ap.add_argument("--after", required=True, help="data directory of the second backup")
    ap.add_argument("--sizes", nargs="+", type=parse_size,
                    default=[parse_size(s) for s in DEFAULT_SIZES.split()],
                    help=f"block sizes (multiples of 8K; default: {DEFAULT_SIZES})")
    ap.add_argument("--zlib", action="store_true",
                    help="also report zlib level 1 compressed size of the new blocks "
                         "(stand-in for LZ4; costs extra CPU)")
    ap.add_argument("--markdown", action="store_true",
                    help="print the result table as Markdown")
    args = ap.parse_args()
    sizes = sorted(set(args.sizes))

    for d in (args.before, args.after):
        if not os.path.isfile(os.path.join(d, "PG_VERSION")):
            raise SystemExit(f"{d}: not a PostgreSQL data directory (no PG_VERSION)")
        if os.path.exists(os.path.join(d, "postmaster.pid")):
            print(f"warning: {d}/postmaster.pid exists; was the copy taken from a "
                  f"running server?", file=sys.stderr)

    for line in describe_machine():
        print(f"# {line}")
    t0 = time.monotonic()
    before, before_total, before_files = scan(args.before, sizes)
    t1 = time.monotonic()
    ref = {s: before[s].ids for s in sizes}
    after, after_total, after_files = scan(args.after, sizes, reference=ref,
                                           want_zlib=args.zlib)
    t2 = time.monotonic()
    print(f"# before: {args.before}: {before_files} files, {before_total} bytes "
          f"({human(before_total)}), scanned in {t1 - t0:.1f} s")
    print(f"# after:  {args.after}: {after_files} files, {after_total} bytes "
          f"({human(after_total)}), scanned in {t2 - t1:.1f} s"
          + (" (incl. zlib-1)" if args.zlib else ""))

    header = ["B", "blocks(before)", "distinct(before)", "stored(before)",
              "new blocks", "new bytes", "new %"]
    if args.zlib:
        header.append("new zlib-1")
    header += ["index (56 B)", "manifest (32 B)"]
    rows = []
    for s in sizes:
        b, a = before[s], after[s]
        union = len(b.ids) + a.new_ids
        row = [label(s), f"{b.blocks}", f"{len(b.ids)}", human(b.distinct_bytes),
               f"{a.new_ids}", human(a.new_bytes),
               f"{100.0 * a.new_bytes / after_total:.2f}" if after_total else "-"]
        if args.zlib:
            ratio = (a.new_zlib / a.new_bytes) if a.new_bytes else 0.0
            row.append(f"{human(a.new_zlib)} ({100 * ratio:.0f}%)")
        row += [human(union * INDEX_BYTES_PER_BLOCK),
                human(a.blocks * MANIFEST_BYTES_PER_BLOCK)]
        rows.append(row)

    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---:" for _ in header) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    # Raw numbers, one line per size, for anyone who wants to post-process.
    print("# raw: B blocks_before distinct_before stored_before blocks_after "
          "new_blocks new_bytes new_zlib1 union_distinct after_total")
    for s in sizes:
        b, a = before[s], after[s]
        print(f"# raw: {s} {b.blocks} {len(b.ids)} {b.distinct_bytes} {a.blocks} "
              f"{a.new_ids} {a.new_bytes} {a.new_zlib if args.zlib else '-'} "
              f"{len(b.ids) + a.new_ids} {after_total}")


if __name__ == "__main__":
    main()
