# Stand-in for the public rust:<version>-bookworm image, which cannot be pulled here: Debian
# bookworm (the local debian:bookworm-slim), the C compiler and libc headers that crates with C
# (ring) need, and this machine's Rust toolchain laid out as the official image lays it out
# (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo, cargo and rustc on PATH).
# The build context (made by tests/container/run) holds local-ca/, this machine's own
# certificate authorities (/usr/local/share/ca-certificates), so cargo trusts what the host
# trusts when it fetches crates (a TLS-inspecting proxy's CA, for one), and rootfs/, the
# toolchain's programs and libraries under usr/local/rustup/toolchains/<version>-<target>/ and
# the cargo, rustc and rustdoc links under usr/local/cargo/bin/. Few layers on purpose: the
# engine's vfs storage keeps every layer as a full copy.
FROM debian:bookworm-slim
ARG RUST_VERSION
COPY local-ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && update-ca-certificates
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=${RUST_VERSION}
COPY rootfs/ /
