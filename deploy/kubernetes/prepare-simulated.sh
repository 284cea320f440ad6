#!/bin/sh
# Fill the simulated overlays' agreed/ directories from an `hfl init` directory:
#
#   hfl init /tmp/hfl-sim          # or: docker run --rm -v /tmp/hfl-sim:/sim hfl-tools:dev init /sim
#   deploy/kubernetes/prepare-simulated.sh /tmp/hfl-sim [PARTY]
#
# Writes policy.toml, plan.toml, initial_weights.npz and sim-platform.tar.gz
# (the simulated platform: development root, PCK chain, collateral and the
# per-machine sealing secret) into overlays/simulated/agreed/,
# overlays/tiered-simulated/agreed/ and trainer/overlays/simulated/agreed/
# (all git-ignored), and PARTY's private
# enrolment key (default party-1; `hfl init` writes parties/<party>.key.pem)
# as trainer/overlays/simulated/agreed/party.key.pem, for the trainer's
# Secret hfl-party-key only: the central overlay gets no party key. The
# platform and the key are development stand-ins, never production secrets,
# but keep them out of version control all the same.
set -eu

usage() { echo "usage: $0 HFL_INIT_DIR [PARTY]" >&2; exit 2; }
[ $# -eq 1 ] || [ $# -eq 2 ] || usage
src=$1
party=${2:-party-1}
here=$(cd "$(dirname "$0")" && pwd)

for f in policy.toml plan.toml initial_weights.npz platform/platform.json; do
    if [ ! -f "$src/$f" ]; then
        echo "$0: $src/$f is missing: is $src an 'hfl init' directory?" >&2
        exit 1
    fi
done
if [ ! -f "$src/parties/$party.key.pem" ]; then
    echo "$0: no enrolment key $src/parties/$party.key.pem: name a party 'hfl init' enrolled ([parties.<name>] in $src/policy.toml)" >&2
    exit 1
fi

# The stand-in for the CPU's sealing key. Every pod unpacks its own copy of
# the platform, so it must exist before packing: otherwise each pod start
# would make a new one and could not read its sealed state after a restart.
if [ ! -f "$src/platform/sealing_secret" ]; then
    (umask 077 && head -c 32 /dev/urandom > "$src/platform/sealing_secret")
fi

for dest in "$here/overlays/simulated/agreed" "$here/overlays/tiered-simulated/agreed" \
        "$here/trainer/overlays/simulated/agreed"; do
    mkdir -p "$dest"
    cp "$src/policy.toml" "$src/plan.toml" "$src/initial_weights.npz" "$dest/"
    (umask 077 && tar -C "$src" -czf "$dest/sim-platform.tar.gz" platform)
    echo "wrote $dest/{policy.toml,plan.toml,initial_weights.npz,sim-platform.tar.gz}"
done

trainer=$here/trainer/overlays/simulated/agreed
(umask 077 && cp "$src/parties/$party.key.pem" "$trainer/party.key.pem")
echo "wrote $trainer/party.key.pem ($party's enrolment key; set HFL_PARTY=$party)"
