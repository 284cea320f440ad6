#!/usr/bin/env bash
# `make sgx-images`: build and sign the SGX images in the order that
# lets trainers pin the central services by MRENCLAVE (docs/deployment.md):
#
#   1. hfl-sgx-attestation and hfl-sgx-aggregator, with the agreed policy
#      deploy/config/policy.toml (every role pinned by MRSIGNER, ISVPRODID and
#      min ISVSVN: an image cannot name its own MRENCLAVE, nor a peer's that
#      depends on it);
#   2. their SIGSTRUCTs copied out (build/gramine/hfl-<svc>.sig) and pinned
#      into deploy/config/policy.trainer.toml (python -m hfl_common.sigstruct
#      --pin-into): the agreed policy plus those two MRENCLAVEs;
#   3. hfl-sgx-trainer with that policy: a trainer accepts exactly this
#      attestation service and aggregator code, not anything the key signs.
#
# A tiered federation (the agreed policy has a [roles.relay] table): after
# the aggregator, hfl-sgx-relay is built FROM it (deploy/sgx-relay.Dockerfile:
# the relay's own manifest, gramine/relay.manifest.template, signed with the
# same key: its own MRENCLAVE), and pinned in step 2 as well, so trainers
# accept exactly this relay code too. Without [roles.relay] no relay image is
# built (a flat federation).
#
# Settings (deploy/deploy.mk passes them): SGX_SIGNING_KEY, HFL_ISVSVN,
# HFL_SGX_IMAGE_TAG, PCCS_URL, USE_SECURE_CERT, GRAMINE_BUILD, GRAMINE_POLICY_PY, and
# PROJECT: a federation project directory for the trainer (its clean copy, the files
# the identity measures, goes to deploy/config/project/<name>/ and into the trainer
# image at /opt/hfl/project/<name>, listed as trusted files).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
KEY=${SGX_SIGNING_KEY:?}
TAG=${HFL_SGX_IMAGE_TAG:-1}
OUT=${GRAMINE_BUILD:-build/gramine}
PY=${GRAMINE_POLICY_PY:-python3}
CENTRAL=(attestation aggregator)

die() { echo "make sgx-images: $*" >&2; exit 2; }

[ -r "$KEY" ] || die "no enclave signing key at $KEY (SGX_SIGNING_KEY=...)"
for f in policy.toml plan.toml initial_weights.npz; do
  [ -s "deploy/config/$f" ] || die "deploy/config/$f is missing; see deploy/config/README.md"
done
$DOCKER version >/dev/null 2>&1 || die "no Docker daemon answers; start it and retry"
# The signing key is a BuildKit secret: the classic builder cannot do it.
if ! $DOCKER buildx version >/dev/null 2>&1; then
  v=$($DOCKER version --format '{{.Client.Version}}')
  [ "${v%%.*}" -lt 23 ] 2>/dev/null \
    || die "needs BuildKit (the signing key is a build secret): install the docker buildx plugin, or use Debian's docker.io client"
fi
# The trainer's project, staged in the build context (the context is always given
# deploy/config/project/, empty without a project).
rm -rf deploy/config/project
mkdir -p deploy/config/project
touch deploy/config/project/.keep
project_args=()
if [ -n "${PROJECT:-}" ]; then
  [ -f "$PROJECT/plan.toml" ] || die "$PROJECT has no plan.toml: not a federation project"
  pname=$(basename "$(cd "$PROJECT" && pwd)")
  [[ "$pname" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "project directory name '$pname' is not a package name"
  mkdir -p "deploy/config/project/$pname"
  (cd "$PROJECT" && find . \( -name '.*' ! -name . -o -name __pycache__ \) -prune -o \
      -type f ! -name '*.pyc' -print0) \
    | (cd "$PROJECT" && xargs -0 -r cp --parents -t "$OLDPWD/deploy/config/project/$pname")
  project_args=(--build-arg "PROJECT_NAME=$pname")
  echo "make sgx-images: the trainer gets project $pname (deploy/config/project/$pname)"
fi
net=()
$DOCKER network inspect bridge >/dev/null 2>&1 || net=(--network host)

build() {  # $1 service, $2 policy file in deploy/config, then extra build flags
  echo "make sgx-images: building and signing hfl-sgx-$1:$TAG with deploy/config/$2"
  local svc=$1 policy=$2
  shift 2
  DOCKER_BUILDKIT=1 $DOCKER build "${net[@]}" "$@" -f deploy/docker/Dockerfile.sgx \
    --build-arg "SERVICE=$svc" --build-arg "POLICY_FILE=$policy" \
    --build-arg "ISVSVN=${HFL_ISVSVN:-1}" \
    --build-arg "PCCS_URL=${PCCS_URL:-https://localhost:8081/sgx/certification/v4/}" \
    --build-arg "USE_SECURE_CERT=${USE_SECURE_CERT:-true}" \
    --secret "id=sgx_signing_key,src=$KEY" \
    -t "hfl-sgx-$svc:$TAG" .
}

build_relay() {  # FROM the aggregator image just built: same site, policy and plan
  echo "make sgx-images: building and signing hfl-sgx-relay:$TAG from hfl-sgx-aggregator:$TAG"
  DOCKER_BUILDKIT=1 $DOCKER build "${net[@]}" -f deploy/sgx-relay.Dockerfile \
    --build-arg "AGGREGATOR_IMAGE=hfl-sgx-aggregator:$TAG" \
    --build-arg "ISVSVN=${HFL_ISVSVN:-1}" \
    --secret "id=sgx_signing_key,src=$KEY" \
    -t "hfl-sgx-relay:$TAG" gramine
}

copy_sig() {  # $1 service
  local cid
  mkdir -p "$OUT"
  cid=$($DOCKER create "hfl-sgx-$1:$TAG")
  $DOCKER cp "$cid:/opt/hfl/build/hfl-$1.sig" "$OUT/hfl-$1.sig"
  $DOCKER cp "$cid:/opt/hfl/build/hfl-$1.sigstruct.json" "$OUT/hfl-$1.sigstruct.json"
  $DOCKER rm "$cid" >/dev/null
}

for svc in "${CENTRAL[@]}"; do
  build "$svc" policy.toml
  copy_sig "$svc"
done
pinned=("${CENTRAL[@]}")
if grep -q '^\[roles\.relay\]' deploy/config/policy.toml; then
  build_relay
  copy_sig relay
  pinned+=(relay)
else
  echo "make sgx-images: deploy/config/policy.toml has no [roles.relay]: no relay image (flat federation)"
fi
roles=()
for svc in "${pinned[@]}"; do roles+=(--role "$svc=$OUT/hfl-$svc.sig"); done
"$PY" -m hfl_common.sigstruct --pin-into deploy/config/policy.toml "${roles[@]}" \
  --out deploy/config/policy.trainer.toml
echo "make sgx-images: pinned ${pinned[*]} by MRENCLAVE in deploy/config/policy.trainer.toml"
build trainer policy.trainer.toml "${project_args[@]}"
copy_sig trainer
echo "make sgx-images: done; SIGSTRUCTs in $OUT/ (make policy writes the [roles] tables for review)"
