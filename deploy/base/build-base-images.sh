#!/bin/sh
# `make base-images`: hfl's own base images, built from Debian packages, for
# hosts that cannot pull python:3.11-slim-bookworm or prom/prometheus from
# Docker Hub (air-gapped or filtered networks). Needs root (debootstrap,
# chroot), debootstrap and a Debian mirror (DEBIAN_MIRROR; a local mirror
# works). Writes two images:
#
#   hfl-base/python:3.11-bookworm   Debian 12 minbase + python3 (3.11.2),
#                                   python3-venv, ca-certificates and the
#                                   host's CA certificates
#   hfl-base/prometheus:bookworm    the above + prometheus and promtool from
#                                   Debian's prometheus package
#
# The host's CA bundle (HFL_CA_BUNDLE) goes into the base: certificates the
# host trusts that Debian's bundle lacks (a TLS-inspecting proxy's CA, a
# company CA) are added as local CAs, so pip inside image builds works behind
# such a proxy. `make up` uses these images when they exist.
set -eu

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${HFL_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKER=${DOCKER:-docker}
PYTHON_TAG=${HFL_BASE_PYTHON_IMAGE:-hfl-base/python:3.11-bookworm}
PROMETHEUS_TAG=${HFL_BASE_PROMETHEUS_IMAGE:-hfl-base/prometheus:bookworm}

fail() { echo "make base-images: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || fail "debootstrap needs root: sudo make base-images"
command -v debootstrap >/dev/null 2>&1 || fail "debootstrap is not installed (apt-get install debootstrap)"
command -v dpkg-deb >/dev/null 2>&1 || fail "dpkg-deb is not installed (a Debian or Ubuntu host has it)"
$DOCKER info >/dev/null 2>&1 || fail "no Docker daemon answers; start it (systemctl start docker, or dockerd &) and retry"
[ -r "$CA_BUNDLE" ] || fail "no CA bundle at $CA_BUNDLE (HFL_CA_BUNDLE=...)"

work=$(mktemp -d "${TMPDIR:-/tmp}/hfl-base.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT INT TERM
rootfs="$work/rootfs"

start=$(date +%s)
echo "debootstrap $SUITE from $MIRROR (minbase + python3, python3-venv, ca-certificates)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed (is $MIRROR reachable? DEBIAN_MIRROR=...)"; }

# The host's extra CAs: each certificate of the host bundle that Debian's
# bundle lacks becomes /usr/local/share/ca-certificates/hfl-host-N.crt.
cp "$CA_BUNDLE" "$rootfs/tmp/host-bundle.crt"
chroot "$rootfs" /usr/bin/python3 - <<'PY'
import re
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
have = set(pem.findall(open("/etc/ssl/certs/ca-certificates.crt").read()))
extra = [c for c in pem.findall(open("/tmp/host-bundle.crt").read()) if c not in have]
for n, cert in enumerate(extra):
    with open(f"/usr/local/share/ca-certificates/hfl-host-{n}.crt", "w") as f:
        f.write(cert + "\n")
print(f"added {len(extra)} CA certificate(s) from the host's bundle")
PY
chroot "$rootfs" /usr/sbin/update-ca-certificates >/dev/null 2>&1
rm -f "$rootfs/tmp/host-bundle.crt"

# Smaller layers (the vfs storage driver copies every layer whole).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
    >"$rootfs/etc/dpkg/dpkg.cfg.d/01-hfl-nodoc"

tar -C "$rootfs" -c . | $DOCKER import \
    --change 'ENV LANG=C.UTF-8 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/usr/bin/python3"]' \
    --message "hfl base: Debian $SUITE minbase, python3, host CAs" \
    - "$PYTHON_TAG" >/dev/null
mid=$(date +%s)
echo "built $PYTHON_TAG in $((mid - start)) s ($($DOCKER run --rm "$PYTHON_TAG" python3 -V))"

# Prometheus: Debian's prometheus package, its two binaries (Go, linked
# against libc only) added to a copy of the same root file system, one layer.
# No container build: nothing here depends on the daemon's build network.
chroot "$rootfs" /bin/sh -ec 'cd /tmp && apt-get update -qq && apt-get download -qq prometheus' \
    >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log" >&2; fail "apt-get download prometheus failed (is $MIRROR reachable?)"; }
deb=$(ls "$rootfs"/tmp/prometheus_*.deb)
dpkg-deb -x "$deb" "$work/prometheus-pkg"
prometheus_version=$(dpkg-deb -f "$deb" Version)
rm -f "$deb"
rm -rf "$rootfs"/var/lib/apt/lists/*
install -m 0755 "$work/prometheus-pkg/usr/bin/prometheus" "$work/prometheus-pkg/usr/bin/promtool" "$rootfs/usr/bin/"
mkdir -p "$rootfs/prometheus" "$rootfs/etc/prometheus"
chown 65534:65534 "$rootfs/prometheus"
tar -C "$rootfs" -c . | $DOCKER import \
    --change 'USER nobody' \
    --change 'WORKDIR /prometheus' \
    --change 'EXPOSE 9090' \
    --change 'VOLUME ["/prometheus"]' \
    --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
    --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    --message "hfl base: Debian $SUITE prometheus $prometheus_version" \
    - "$PROMETHEUS_TAG" >/dev/null
echo "built $PROMETHEUS_TAG in $(($(date +%s) - mid)) s (prometheus $prometheus_version)"
