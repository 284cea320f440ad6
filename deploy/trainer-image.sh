#!/usr/bin/env bash
# `make trainer-image PROJECT=DIR`: build a party's trainer image with a federation project.
#
#   deploy/trainer-image.sh DIR [IMAGE]
#
# Builds deploy/docker/Dockerfile.project FROM the hfl trainer image
# ($TRAINER_IMAGE, default hfl-trainer:$HFL_IMAGE_TAG: `make up` builds it) with the
# project's files at /opt/hfl/project/<name>, where <name> is the directory's
# name (the project's package name). IMAGE defaults to hfl-trainer-<name>:$HFL_IMAGE_TAG.
# Then prints the simulated MRENCLAVE of a trainer of that image, as the image's
# own code measures it: the value a simulation policy names for this trainer.
#
# Only what hfl_common.tee.identities measures is copied (no __pycache__, *.pyc
# or hidden entries), into a fresh build context: nothing else of the host, and
# never the party's data, which is mounted at /data at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
TAG=${HFL_IMAGE_TAG:-dev}
TRAINER_IMAGE=${TRAINER_IMAGE:-hfl-trainer:$TAG}
die() { echo "make trainer-image: $*" >&2; exit 2; }

project=${1:-}
[ -n "$project" ] || die "give the project directory: make trainer-image PROJECT=path/to/project"
[ -d "$project" ] || die "$project is not a directory (a federation project from 'hfl new')"
project=$(cd "$project" && pwd)
name=$(basename "$project")
[[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] \
  || die "the project directory's name '$name' is its Python package name and must be one (letters, digits, _)"
[ -f "$project/plan.toml" ] || die "$project has no plan.toml: not a federation project (hfl new DIR makes one)"
[ -f "$project/__init__.py" ] || die "$project has no __init__.py: the project must be a Python package"
image=${2:-hfl-trainer-$name:$TAG}
$DOCKER version >/dev/null 2>&1 || die "no Docker daemon answers; start it and retry"
$DOCKER image inspect "$TRAINER_IMAGE" >/dev/null 2>&1 \
  || die "no image $TRAINER_IMAGE; build it first (make up builds hfl-trainer:\$HFL_IMAGE_TAG) or set TRAINER_IMAGE"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/project"
# The files hfl_common.tee.identities.project_files measures, and only those.
(cd "$project" && find . \( -name '.*' ! -name . -o -name __pycache__ \) -prune -o \
    -type f ! -name '*.pyc' -print0) \
  | (cd "$project" && xargs -0 -r cp --parents -t "$ctx/project")
# Readable by the trainer (uid hfl), writable by nobody but root.
chmod -R a+rX,go-w "$ctx/project"
files=$(find "$ctx/project" -type f | wc -l)
bytes=$(du -sb "$ctx/project" | cut -f1)
if [ "$bytes" -gt $((20 * 1024 * 1024)) ]; then
  die "$project holds $((bytes / 1024 / 1024)) MB: keep data out of the project (it is measured and shipped); the party's data is mounted at /data"
fi
cp deploy/docker/Dockerfile.project "$ctx/Dockerfile"
net=()
$DOCKER network inspect bridge >/dev/null 2>&1 || net=(--network host)
echo "make trainer-image: building $image FROM $TRAINER_IMAGE with $files files of $project at /opt/hfl/project/$name"
$DOCKER build -q "${net[@]}" --build-arg "TRAINER_IMAGE=$TRAINER_IMAGE" \
  --build-arg "PROJECT_NAME=$name" -t "$image" "$ctx" >/dev/null
# The simulated MRENCLAVE is a hash of code only; the throw-away platform is for the API.
mrenclave=$($DOCKER run --rm --network none --entrypoint python "$image" -c "$(cat <<'PY'
import os, tempfile
from pathlib import Path
from hfl_common.tee import SimulatedPlatform
from hfl_common.tee.identities import service_identity
platform = SimulatedPlatform.load_or_create(Path(tempfile.mkdtemp()) / "platform")
print(service_identity("trainer", platform, project=Path(os.environ["HFL_PROJECT"])).mrenclave.hex())
PY
)")
echo "make trainer-image: built $image"
echo "make trainer-image: simulated trainer MRENCLAVE $mrenclave (hfl's trainer code + the project's files)"
