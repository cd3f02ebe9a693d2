# nginx for deploy/compose.yaml: Debian's nginx package; deploy/nginx.conf is mounted at
# /etc/nginx/nginx.conf. Built by scripts/docker-build.sh nginx (BASE: a local Debian where no
# registry is reachable), or by compose.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
ARG NGINX_VERSION=1.22.1-*
RUN apt-get update \
    && apt-get install -y --no-install-recommends "nginx-light=${NGINX_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
# SIGQUIT: finish the requests in flight, then exit (SIGTERM would cut them off).
STOPSIGNAL SIGQUIT
ENTRYPOINT ["nginx", "-g", "daemon off;"]
