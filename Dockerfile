# The hangar image: one binary, `hangar operator|proxy|webhook`.
#
# Stages:
#   build     compiles hangar in a Rust image (BUILDER_IMAGE) - the default, for machines
#             that can pull one.
#   prebuilt  takes a binary compiled on the host instead (HANGAR_BINARY, a path in the
#             context): `--build-arg BINARY_FROM=prebuilt`. For offline machines (the test
#             bed has no Rust image; it builds with cargo on the host). Needs BuildKit so
#             that the unused `build` stage is skipped.
#   runtime   collects from a Debian bookworm image (BASE_IMAGE; the test bed's
#             locally made Python base is one) exactly what a glibc Rust binary needs:
#             the dynamic loader, libc, libm, libgcc_s, and the CA bundle.
#             (checked: the binary runs chrooted into exactly those files)
#   final     FROM scratch: those files + the binary, non-root (65532). No shell.
ARG BUILDER_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim
ARG BINARY_FROM=build

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin hangar && cp target/release/hangar /hangar

FROM ${BASE_IMAGE} AS prebuilt
ARG HANGAR_BINARY=target/release/hangar
COPY ${HANGAR_BINARY} /hangar

FROM ${BINARY_FROM} AS binary

FROM ${BASE_IMAGE} AS runtime
COPY --from=binary /hangar /rootfs/usr/local/bin/hangar
# Copy each shared library the binary links (and the loader), keeping their paths.
RUN set -eu; \
    ldd /rootfs/usr/local/bin/hangar | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | sort -u > /tmp/libs; \
    test -s /tmp/libs; \
    while read -r lib; do \
      mkdir -p "/rootfs$(dirname "$lib")"; cp -L "$lib" "/rootfs$lib"; \
    done < /tmp/libs; \
    mkdir -p /rootfs/etc/ssl/certs /rootfs/tmp; chmod 1777 /rootfs/tmp; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/; fi; \
    echo 'nonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin' > /rootfs/etc/passwd; \
    echo 'nonroot:x:65532:' > /rootfs/etc/group; \
    chroot /rootfs /usr/local/bin/hangar --version

FROM scratch
COPY --from=runtime /rootfs/ /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/hangar"]
CMD ["--help"]
