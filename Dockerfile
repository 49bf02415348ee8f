# syntax=docker/dockerfile:1
# The pgmm image: the `pgmm` binary on a slim Debian, run as a non-root user (uid/gid 999, the
# uid the Helm chart runs its pods as). Build from the repository root:
#
#   docker build -t pgmm:0.1.0 .            # or: podman build / buildah bud
#
# The tag the chart expects by default is `pgmm:<chart appVersion>` (helm/pgmm/values.yaml). Both
# base images are build arguments, so a builder without registry access can use local ones, and
# a context with vendored crates builds without network (.ci/image-build does both).
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# What .dockerignore lets through: the workspace manifest, the crate, its migrations, the
# integration tests (proxy/Cargo.toml names them; cargo reads their paths, not their code) and,
# for a build without network, vendor/ with the .cargo/config.toml that `cargo vendor` prints.
COPY . .
# The registry and target caches survive between builds (BuildKit, buildah and podman alike);
# the binary is copied out of the cache mount so that the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pgmm \
    && cp target/release/pgmm /usr/local/bin/pgmm

FROM ${RUNTIME_IMAGE}
# pgmm needs glibc and nothing else from the system: no shell tools, no CA bundle (its TLS
# peers are verified against the CA file its config names, not the system's roots).
RUN groupadd --system --gid 999 pgmm \
    && useradd --system --uid 999 --gid 999 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pgmm
COPY --from=build /usr/local/bin/pgmm /usr/local/bin/pgmm
USER 999:999
# [client] listen, [peer] listen, [metrics] listen in the chart's configuration.
EXPOSE 6432 7432 9187
ENTRYPOINT ["pgmm"]
CMD ["--help"]
