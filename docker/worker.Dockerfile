# syntax=docker/dockerfile:1
# An EventOps worker image: one binary built on consumer-runtime, on distroless/cc,
# non-root. The package and binary are build arguments, so every example worker (and
# your own workers in this workspace) use this one file:
#
#   docker build -f docker/worker.Dockerfile \
#     --build-arg PACKAGE=order-processing --build-arg BIN=inventory \
#     -t eventops/order-processing-inventory:0.1 .
#
# The operator starts it with the environment contract of consumer-runtime
# (consumer-runtime/src/contract.rs) and probes the health server on port 8080.

FROM rust:1.95-bookworm AS build
ARG PACKAGE
ARG BIN
RUN test -n "$PACKAGE" && test -n "$BIN" \
    || { echo "set --build-arg PACKAGE=<cargo package> --build-arg BIN=<binary>" >&2; exit 1; }
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p "$PACKAGE" --bin "$BIN" \
 && install -D -m 0755 "target/release/$BIN" /out/worker \
 && install -D -m 0644 "/lib/$(gcc -print-multiarch)/libz.so.1" /out/lib/libz.so.1

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lib/libz.so.1 /usr/lib/libz.so.1
COPY --from=build /out/worker /usr/local/bin/worker
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/worker"]
