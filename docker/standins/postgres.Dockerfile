# Local stand-in of postgres:17-bookworm: Debian bookworm's PostgreSQL (15) behind an entrypoint that
# keeps the official image's contract as trainflow's compose file uses it (POSTGRES_USER/_PASSWORD/_DB,
# PGDATA, /docker-entrypoint-initdb.d on the first start with a socket-only server, pg_isready).
ARG DEBIAN_IMAGE=trainflow-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin
ENV LANG=C.UTF-8 \
    PATH=/usr/lib/postgresql/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY --chmod=0755 postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
