# The managed plugin's root filesystem (scripts/build-plugin exports it into the plugin).
# BASE: a Debian bookworm image; where no registry is reachable, scripts/build-plugin makes
# one with debootstrap and passes it here.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# Debian's packages only: btrfsutil is Debian's python3-btrfsutil (PyPI's does not build
# against bookworm's libbtrfsutil). util-linux: mount, losetup; e2fsprogs: chattr.
# python3-docker: the Docker Engine API client that pauses containers for quiesce.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-flask gunicorn python3-btrfsutil python3-docker btrfs-progs util-linux \
      mount e2fsprogs \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
      /usr/share/info/* /usr/share/locale/* /var/log/*

COPY plugin /opt/snapvol/plugin
RUN mkdir -p /run/docker/plugins /mnt/volumes /mnt/host /mnt/docker-run /run/snapvol \
 && python3 -m compileall -q /opt/snapvol/plugin

WORKDIR /opt/snapvol
ENV SNAPVOL_STATE_DIR=/mnt/host/snapvol SNAPVOL_PUBLISH_DIR=/mnt/volumes
# The same command as config.json's entrypoint, for `docker run` debugging.
CMD ["/usr/bin/gunicorn", "-c", "python:plugin.gunicorn_conf"]
