# syntax=docker/dockerfile:1
#
# One image definition for every service binary in the workspace:
#   docker build --build-arg SERVICE=order -t saga-order .
# docker-compose.yml builds order, payment, inventory and shipping from here.

FROM rust:1.95-bookworm AS builder
ARG SERVICE
WORKDIR /app
# No database is reachable during an image build: any sqlx query macros must
# compile from the committed .sqlx metadata.
ENV SQLX_OFFLINE=true
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    test -n "${SERVICE}" && \
    cargo build --release --locked --bin "${SERVICE}"

FROM debian:bookworm-slim AS runtime
ARG SERVICE
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin saga
COPY --from=builder /app/target/release/${SERVICE} /usr/local/bin/service
USER saga
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/service"]
