# The managed plugin's root filesystem (scripts/build-plugin exports it into the plugin).
# BASE: a Debian bookworm image; where no registry is reachable, scripts/build-plugin makes
# one with debootstrap and passes it here.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# Debian's packages only: btrfsutil is Debian's python3-btrfsutil (PyPI's does not build
# against bookworm's libbtrfsutil). util-linux: mount, losetup; e2fsprogs: chattr.
# python3-docker: the Docker Engine API client that pauses containers for quiesce.
# openssh-client: ssh:// replication targets and standbys. zstd: compressed streams;
# python3-xxhash: the cheap stream check (plugin/stream.py; CRC-32 without it).
# zfsutils-linux + python3-pyzfs (contrib): the ZFS backend on the host's OpenZFS through
# /dev/zfs. The userland must match the host's module (the plugin refuses to start when they
# differ): bookworm's is OpenZFS 2.1.11; ZFS_SUITE=bookworm-backports builds one for 2.3.x.
ARG ZFS_SUITE=bookworm
RUN set -eu; \
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do \
      [ -f "$f" ] || continue; \
      sed -i -E 's/^(Components: main)$/\1 contrib/; s/^(deb .* main)$/\1 contrib/' "$f"; \
    done; \
    if [ "$ZFS_SUITE" != bookworm ]; then \
      mirror="$(grep -hoE 'https?://[^ ]+' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n1)"; \
      echo "deb $mirror $ZFS_SUITE main contrib" > /etc/apt/sources.list.d/zfs.list; \
      printf 'Package: src:zfs-linux\nPin: release n=%s\nPin-Priority: 990\n' "$ZFS_SUITE" \
        > /etc/apt/preferences.d/zfs; \
    fi
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-flask gunicorn python3-btrfsutil python3-docker btrfs-progs util-linux \
      mount e2fsprogs zfsutils-linux python3-pyzfs openssh-client \
      python3-prometheus-client zstd python3-xxhash \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
      /usr/share/info/* /usr/share/locale/* /var/log/*

COPY plugin /opt/snapvol/plugin
RUN mkdir -p /run/docker/plugins /mnt/volumes /mnt/host /mnt/docker-run /run/snapvol \
 && python3 -m compileall -q /opt/snapvol/plugin

WORKDIR /opt/snapvol
ENV SNAPVOL_STATE_DIR=/mnt/host/snapvol SNAPVOL_PUBLISH_DIR=/mnt/volumes
# The same command as config.json's entrypoint, for `docker run` debugging.
CMD ["/usr/bin/python3", "-m", "plugin.prebind", "/usr/bin/python3", "-m", "plugin.serve", "-c", "python:plugin.gunicorn_conf"]
