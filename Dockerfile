# One image with every service binary and the operator's sagactl, built
# once; docker-compose.yml runs each service from it by name
# (command: ["order"], ...):
#   docker build -t saga-services:local .
#   docker run --rm saga-services:local order
#   docker compose exec order sagactl dlq list
#
# cargo-chef builds the dependencies in a layer of their own, so a change to
# the project's code rebuilds only the project's crates.
#
# Behind a proxy that presents its own certificate authority, pass it (PEM
# text) so the builder can fetch crates: compose takes EXTRA_CA_CERTS from
# .env or the shell, `docker build` as --build-arg EXTRA_CA_CERTS="$(cat ca.crt)".

FROM rust:1.95-bookworm AS chef
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/extra.crt \
        && update-ca-certificates; \
    fi
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p order -p payment -p inventory -p shipping -p sagactl
COPY . .
RUN cargo build --release --locked --bins \
    -p order -p payment -p inventory -p shipping -p sagactl

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin saga
COPY --from=builder \
    /app/target/release/order \
    /app/target/release/payment \
    /app/target/release/inventory \
    /app/target/release/shipping \
    /app/target/release/sagactl \
    /usr/local/bin/
USER saga
EXPOSE 8080
