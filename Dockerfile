# syntax=docker/dockerfile:1
#
# walvault: the binary and what its daemon needs next to PostgreSQL 15.
#
#   docker build -t walvault .
#   docker run --rm walvault --version
#   docker compose up --build            (walvault + PostgreSQL + Garage, see docker-compose.yml)
#
# The runtime image has PostgreSQL 15's server binaries: a drill recovers a
# backup into a scratch directory and starts a server on it (in this
# container, as the user walvault). A cluster of another major needs its
# server package instead of postgresql-15.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# aws-lc-sys (the S3 client's TLS) builds C code; cmake helps on platforms
# without its pregenerated build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# what the manifest names (the library, the binary, tests, benches, examples)
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY benches ./benches
COPY examples ./examples
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin walvault \
 && install -m 0755 target/release/walvault /usr/local/bin/walvault

FROM debian:${DEBIAN_RELEASE}-slim
ENV DEBIAN_FRONTEND=noninteractive
# - ca-certificates: TLS to S3 and to PostgreSQL with sslmode=verify-full;
# - curl: the health check;
# - postgresql-15 (server: drills) and postgresql-client-15 (psql,
#   pg_amcheck, pg_checksums), from Debian; postgresql-common is installed
#   first and told not to create a cluster of its own;
# - locales with en_US.UTF-8: the postgres image's clusters use it, and a
#   drill's recovered copy must find its locale here to start.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl locales postgresql-common; \
    sed -ri 's/^#?\s*(create_main_cluster)\s*=.*$/\1 = false/' /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15; \
    sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' /etc/locale.gen; \
    locale-gen; \
    rm -rf /var/lib/apt/lists/*

# a fixed uid/gid, for runAsUser and file ownership on volumes
RUN groupadd --system --gid 10001 walvault \
 && useradd --system --uid 10001 --gid walvault --home-dir /var/lib/walvault \
      --shell /usr/sbin/nologin walvault \
 && install -d -o walvault -g walvault -m 0750 /var/lib/walvault \
 && install -d -m 0755 /etc/walvault

COPY --from=build /usr/local/bin/walvault /usr/local/bin/walvault
# creates the repository on the daemon's first start (docker-compose.yml uses it)
COPY --chmod=0755 deploy/walvault-entrypoint.sh /usr/local/bin/walvault-entrypoint

USER walvault:walvault
WORKDIR /var/lib/walvault
# the status file and drills' scratch copies
VOLUME ["/var/lib/walvault"]
EXPOSE 9187
# /healthz answers 200 while the daemon runs (its body says how healthy the
# backups are; /metrics and /api/status say it in detail). The daemon listens
# on 127.0.0.1:9187 by default, or 0.0.0.0:9187 with --listen: both answer here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
  CMD curl -fsS --max-time 4 http://127.0.0.1:9187/healthz || exit 1

ENTRYPOINT ["walvault"]
CMD ["daemon"]
