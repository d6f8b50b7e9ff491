# Stand-in for the public redis image: Debian bookworm's redis-server (7.0) laid out like the
# official image (data in /data, which is also the working directory; runs as the redis user).
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server"]
