# lockjam's container image: built with the Rust image, run on distroless
# (glibc, CA certificates, no shell) as an unprivileged user.
#
#   docker build -t lockjam:0.1.0 .
#   docker run --rm -p 9863:9863 -e LOCKJAM_DSN='host=db user=lockjam ...' lockjam:0.1.0
#
# Probes (no shell or curl in the image, so no HEALTHCHECK): liveness GET
# /healthz, readiness GET /readyz, both open when [server] auth is set;
# deploy/kubernetes/deployment.yaml has them.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Manifests first, so that dependencies build in their own cached layer.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin lockjam \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin lockjam

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/lockjam /usr/local/bin/lockjam
COPY config/lockjam.toml /etc/lockjam/lockjam.toml
# The image is for containers: listen on every interface (lockjam's own
# default is loopback, because /api/v1/snapshot shows query texts).
ENV LOCKJAM_LISTEN=0.0.0.0:9863
EXPOSE 9863
# 65532 is distroless's nonroot user.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/lockjam"]
CMD ["run"]
