# The hangar image: one binary, `hangar operator|proxy|webhook|node-agent`.
#
# It packs a hangar binary built on the host (`cargo build --release`; HANGAR_BINARY, a path
# in the context) on a Debian bookworm base (BASE_IMAGE): build the binary on bookworm, or
# any system whose glibc is not newer than bookworm's 2.36 (the check below fails otherwise).
# (An earlier `build` stage compiled hangar in a Rust image; no test could run it on the
# offline machines this project is tested on, so it is gone rather than left unchecked.)
#
#   runtime   collects from BASE_IMAGE exactly what runs: the binary and the shared
#             libraries it links (loader, libc, libm, libgcc_s), git with its http(s)
#             transport helper and their libraries (the builder checks Spaces out with
#             `git`), and the CA bundle. git and the CA bundle are installed with apt when
#             the base lacks them (debian:bookworm-slim does); only this stage gets them.
#             Checked: hangar and git run chrooted into exactly those files, and git's
#             http and https helpers load.
#   final     FROM scratch: those files, non-root (65532), HOME=/tmp. No shell.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime
RUN set -eu; \
    if ! command -v git >/dev/null || [ ! -f /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update -q; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends git ca-certificates; \
      rm -rf /var/lib/apt/lists/*; \
    fi
ARG HANGAR_BINARY=target/release/hangar
COPY ${HANGAR_BINARY} /rootfs/usr/local/bin/hangar
RUN set -eu; \
    core=/usr/lib/git-core; \
    # (an empty templates directory keeps `git init` from warning that it is missing)
    mkdir -p /rootfs/usr/bin "/rootfs$core" /rootfs/usr/share/git-core/templates /rootfs/etc/ssl/certs /rootfs/tmp; \
    cp /usr/bin/git /rootfs/usr/bin/git; \
    cp "$core/git-remote-http" "/rootfs$core/git-remote-http"; \
    ln -s ../../bin/git "/rootfs$core/git"; \
    ln -s git-remote-http "/rootfs$core/git-remote-https"; \
    # Each shared library they link (and the loader), keeping its path.
    for exe in /rootfs/usr/local/bin/hangar /rootfs/usr/bin/git "/rootfs$core/git-remote-http"; do \
      ldd "$exe" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}'; \
    done | sort -u > /tmp/libs; \
    test -s /tmp/libs; \
    while read -r lib; do \
      mkdir -p "/rootfs$(dirname "$lib")"; cp -L "$lib" "/rootfs$lib"; \
    done < /tmp/libs; \
    chmod 1777 /rootfs/tmp; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/; \
    echo 'nonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin' > /rootfs/etc/passwd; \
    echo 'nonroot:x:65532:' > /rootfs/etc/group; \
    chroot /rootfs /usr/local/bin/hangar --version; \
    # git wants /dev/null and /dev/urandom, which the container runtime provides; here
    # only for the checks.
    mkdir /rootfs/dev; mknod -m 666 /rootfs/dev/null c 1 3; mknod -m 444 /rootfs/dev/urandom c 1 9; \
    chroot /rootfs /usr/bin/git --version; \
    # The builder's steps on a repository of its own, then both transports up to the
    # connection (nothing listens on port 1): the helper and its TLS libraries load.
    chroot /rootfs /usr/bin/git -c init.defaultBranch=main init -q /tmp/check; \
    chroot /rootfs /usr/bin/git -C /tmp/check -c user.name=c -c user.email=c@c commit -q --allow-empty -m check; \
    chroot /rootfs /usr/bin/git -C /tmp/check rev-parse HEAD; \
    rm -rf /rootfs/tmp/check; \
    for scheme in http https; do \
      if chroot /rootfs /usr/bin/git ls-remote "$scheme://127.0.0.1:1/check.git" >/tmp/out 2>&1; then exit 1; fi; \
      grep -q 'Failed to connect to 127.0.0.1 port 1' /tmp/out || { cat /tmp/out; exit 1; }; \
    done; \
    rm -rf /rootfs/dev

FROM scratch
COPY --from=runtime /rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin \
    HOME=/tmp \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/hangar"]
CMD ["--help"]
