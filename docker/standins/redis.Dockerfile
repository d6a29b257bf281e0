# Local stand-in of redis:7.4-bookworm: Debian bookworm's Redis server and redis-cli, working dir /data.
ARG DEBIAN_IMAGE=trainflow-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
