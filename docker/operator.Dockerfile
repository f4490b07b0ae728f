# syntax=docker/dockerfile:1
# The EventOps operator image: the `eventops-operator` binary on distroless/cc, non-root.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/eventops/eventops-operator:0.1.0 .
#
# Build context: the repository root. The image name matches the chart's default
# (charts/eventops/values.yaml image.repository) and the workspace binary's name.

# Rust as pinned by the workspace's rust-version or newer, on the same Debian release as
# the runtime image so libssl matches.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cargo's registry and the target directory are cache mounts: rebuilds reuse them.
# distroless/cc has glibc, libgcc and OpenSSL but not zlib, which librdkafka links: it is
# copied over (`ldd eventops-operator`: libz, libssl, libcrypto, libgcc_s, libm, libc).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p eventops-operator \
 && install -D -m 0755 target/release/eventops-operator /out/eventops-operator \
 && install -D -m 0644 "/lib/$(gcc -print-multiarch)/libz.so.1" /out/lib/libz.so.1

# glibc, libgcc, OpenSSL 3 and CA certificates; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lib/libz.so.1 /usr/lib/libz.so.1
COPY --from=build /out/eventops-operator /usr/local/bin/eventops-operator
# 65532 = nonroot in distroless; the chart runs it with a read-only root filesystem.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/eventops-operator"]
CMD ["run"]
