#!/usr/bin/env bash
# `make up`, `make down`, `make operator` for deploy/compose.yaml (deploy/deploy.mk calls this).
#
#   deploy/compose.sh up        check, build the images, start the profile, show what runs
#   deploy/compose.sh down      stop and remove the containers (WIPE=1: the volumes too)
#   deploy/compose.sh operator  copy the operator's key, the policy and the platform's
#                               public root out of the volumes into $HFL_OPERATOR_OUT
#   deploy/compose.sh party     copy what one party's trainer needs (policy, plan, initial
#                               weights, simulated platform, its own key) into $HFL_PARTY_OUT
#   deploy/compose.sh trainer-up / trainer-down
#                               one party's trainer as its own compose project
#                               (deploy/compose.trainer.yaml)
#
# Every check that can fail runs before anything starts: no Docker daemon, no
# compose, a port in use, a base image that cannot be pulled, a volume made
# by an older hfl. Each ends in one line that says what to do, exit 2. If
# `compose up` itself fails, what it started is removed again (volumes kept).
#
# Settings (environment; deploy/deploy.mk passes its variables):
#   PROFILE              simulated (default) or sgx
#   HFL_COMPOSE_PROJECT          compose project name (default hfl): containers, network, volumes
#   HFL_IMAGE_TAG        tag of the hfl-* images built here (default dev)
#   HFL_ROUNDS           rounds of the simulated federation (first `make up` only)
#   HFL_BASE             auto (default): hfl's own base images when `make base-images`
#                        made them, else Docker Hub's; or hub, or local
#   HFL_BUILD_NETWORK    network for RUN steps; default: host when the daemon has
#                        no default bridge (dockerd --bridge=none), else the default
#   HFL_GRAFANA          auto (default: when its image is present or can be pulled), 0, 1
#   COMPOSE, DOCKER      the compose and docker commands (default: detected)
#   HFL_SERVICES         up: start only these services (and what they depend on), e.g.
#                        "attestation aggregator" for the central services alone
#   HFL_BUILD            up: 1 (default) builds the images; 0 uses the hfl-*:$HFL_IMAGE_TAG
#                        images already there
# party (deploy/deploy.mk passes PARTY=): HFL_PARTY_NAME, HFL_PARTY_OUT
# trainer-up / trainer-down (deploy/deploy.mk passes PARTY=, AGGREGATOR=, ...):
#   HFL_TRAINER_PARTY, HFL_TRAINER_AGGREGATOR, HFL_TRAINER_ATTESTATION (host:port),
#   HFL_TRAINER_PARTY_DIR (default build/parties/<party>), HFL_TRAINER_DATA,
#   HFL_TRAINER_OUTPUT (default build/parties/<party>-model), HFL_TRAINER_IMAGE
#   (default hfl-trainer:$HFL_IMAGE_TAG), HFL_TRAINER_METRICS_PORT (default 9410),
#   HFL_TRAINER_PROJECT (compose project; default hfl-<party>)
set -euo pipefail

cd "$(dirname "$0")/.."
# docker-compose 1.29 gives up on a daemon call after 60 s; creating a
# container from a 2 GB image on the vfs storage driver copies it whole.
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-600}

PROFILE=${PROFILE:-simulated}
PROJECT=${HFL_COMPOSE_PROJECT:-hfl}
TAG=${HFL_IMAGE_TAG:-dev}
DOCKER=${DOCKER:-docker}
COMPOSE_FILE=deploy/compose.yaml
HUB_PYTHON=python:3.11-slim-bookworm
HUB_PROMETHEUS=prom/prometheus:v2.55.1
GRAFANA_IMAGE=grafana/grafana:11.4.0
LOCAL_PYTHON=hfl-base/python:3.11-bookworm
LOCAL_PROMETHEUS=hfl-base/prometheus:bookworm
# tools is built on the trainer image (TRAINER_IMAGE), so after it.
SIM_IMAGES=(attestation aggregator trainer tools)
PUBLISHED_PORTS=(7400 7401 9090)

say() { echo "make $CMD: $*"; }
die() { echo "make $CMD: $*" >&2; exit 2; }

compose_cmd() {
  if [ -n "${COMPOSE:-}" ]; then
    echo "$COMPOSE"
  elif $DOCKER compose version >/dev/null 2>&1; then
    echo "$DOCKER compose"
  elif command -v docker-compose >/dev/null 2>&1; then
    echo docker-compose
  fi
}

need_daemon() {
  command -v "${DOCKER%% *}" >/dev/null 2>&1 \
    || die "no docker command; install Docker (Debian: apt-get install docker.io) and retry"
  local err
  if ! err=$($DOCKER version --format '{{.Server.Version}}' 2>&1 >/dev/null); then
    case "$err" in
      *permission\ denied*)
        die "no permission to use the Docker daemon; add yourself to the docker group or use sudo, then retry" ;;
      *)
        die "no Docker daemon answers (${DOCKER_HOST:-unix:///var/run/docker.sock}); start it (sudo systemctl start docker) and retry" ;;
    esac
  fi
  COMPOSE_BIN=$(compose_cmd)
  [ -n "$COMPOSE_BIN" ] \
    || die "neither 'docker compose' (v2) nor docker-compose (1.29+) is installed; install one (Debian: apt-get install docker-compose) and retry"
}

compose() {
  # shellcheck disable=SC2086  # COMPOSE_BIN is a command with arguments
  $COMPOSE_BIN -p "$PROJECT" -f "$COMPOSE_FILE" "$@"
}

profiles() {
  local p=(--profile "$PROFILE")
  [ "${GRAFANA_ON:-0}" = 1 ] && p+=(--profile grafana)
  echo "${p[@]}"
}

project_containers() {
  $DOCKER ps -a -q --filter "label=com.docker.compose.project=$PROJECT"
}

project_containers_of() {
  $DOCKER ps -a -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -1
}

port_in_use() {
  # Something accepts connections on the port (any address) from this host.
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

have_image() { $DOCKER image inspect "$1" >/dev/null 2>&1; }

pull_or_fail() {
  # $1 image, $2 what to do instead
  have_image "$1" && return 0
  say "pulling $1"
  if ! $DOCKER pull -q "$1" >/dev/null 2>"$TMPD/pull.err"; then
    die "cannot pull $1 ($(tail -1 "$TMPD/pull.err" | cut -c1-160)); $2"
  fi
}

choose_bases() {
  local base=${HFL_BASE:-auto}
  case "$base" in
    auto) if have_image "$LOCAL_PYTHON"; then base=local; else base=hub; fi ;;
    hub|local) ;;
    *) die "HFL_BASE must be auto, hub or local, not '$base'" ;;
  esac
  local offline="build hfl's own base images from Debian packages with 'sudo make base-images' (docs/deployment.md), then make up again"
  if [ "$base" = local ]; then
    have_image "$LOCAL_PYTHON" || die "no $LOCAL_PYTHON image; $offline"
    have_image "$LOCAL_PROMETHEUS" || die "no $LOCAL_PROMETHEUS image; $offline"
    export HFL_PYTHON_IMAGE=${HFL_PYTHON_IMAGE:-$LOCAL_PYTHON}
    export HFL_PROMETHEUS_IMAGE=${HFL_PROMETHEUS_IMAGE:-$LOCAL_PROMETHEUS}
  else
    export HFL_PYTHON_IMAGE=${HFL_PYTHON_IMAGE:-$HUB_PYTHON}
    export HFL_PROMETHEUS_IMAGE=${HFL_PROMETHEUS_IMAGE:-$HUB_PROMETHEUS}
    [ "$PROFILE" = simulated ] && pull_or_fail "$HFL_PYTHON_IMAGE" "$offline"
    pull_or_fail "$HFL_PROMETHEUS_IMAGE" "$offline"
  fi
  case "${HFL_GRAFANA:-auto}" in
    0) GRAFANA_ON=0 ;;
    1) pull_or_fail "$GRAFANA_IMAGE" "start without Grafana: make up HFL_GRAFANA=0"; GRAFANA_ON=1 ;;
    *)
      GRAFANA_ON=0
      if have_image "$GRAFANA_IMAGE" || $DOCKER pull -q "$GRAFANA_IMAGE" >/dev/null 2>&1; then
        GRAFANA_ON=1
      fi ;;
  esac
}

builder_env() {
  # BuildKit when the client has it (buildx, or the 20.10 client's built-in
  # one); otherwise the classic builder, which the Dockerfiles also support.
  if $DOCKER buildx version >/dev/null 2>&1; then
    echo 1
  else
    local v
    v=$($DOCKER version --format '{{.Client.Version}}' 2>/dev/null || echo 0)
    if [ "${v%%.*}" -lt 23 ] 2>/dev/null; then echo 1; else echo 0; fi
  fi
}

build_images() {
  local buildkit net=()
  buildkit=$(builder_env)
  local network=${HFL_BUILD_NETWORK:-}
  if [ -z "$network" ] && ! $DOCKER network inspect bridge >/dev/null 2>&1; then
    network=host
  fi
  [ -n "$network" ] && net=(--network "$network")
  local kind=classic
  [ "$buildkit" = 1 ] && kind=BuildKit
  say "building ${SIM_IMAGES[*]} on $HFL_PYTHON_IMAGE ($kind builder${network:+, network $network}); log: $TMPD/build-*.log"
  local svc t0 t1
  for svc in "${SIM_IMAGES[@]}"; do
    t0=$(date +%s)
    if ! DOCKER_BUILDKIT=$buildkit $DOCKER build "${net[@]}" \
        --build-arg "PYTHON_IMAGE=$HFL_PYTHON_IMAGE" --build-arg "TRAINER_IMAGE=hfl-trainer:$TAG" \
        -f "deploy/docker/Dockerfile.$svc" -t "hfl-$svc:$TAG" . >"$TMPD/build-$svc.log" 2>&1; then
      tail -25 "$TMPD/build-$svc.log" >&2
      if grep -qiE "could not resolve|temporary failure|connection (refused|reset)|network is unreachable|certificate verify failed|SSL" "$TMPD/build-$svc.log"; then
        die "building hfl-$svc failed: PyPI unreachable from the build (proxy? TLS inspection?); with a TLS-inspecting proxy use 'sudo make base-images' (it trusts the host's CA bundle), or set HFL_BUILD_NETWORK=host"
      fi
      die "building hfl-$svc failed (log above, all of it in $TMPD/build-$svc.log)"
    fi
    t1=$(date +%s)
    say "built hfl-$svc:$TAG in $((t1 - t0)) s"
  done
}

check_ports() {
  # A second `make up` of a running deployment finds its own ports in use: fine.
  [ -n "$(project_containers)" ] && return 0
  local ports=("${PUBLISHED_PORTS[@]}") port
  case "${HFL_GRAFANA:-auto}" in
    1) ports+=(3000) ;;
    auto) have_image "$GRAFANA_IMAGE" && ports+=(3000) ;;
  esac
  for port in "${ports[@]}"; do
    if port_in_use "$port"; then
      die "port $port is already in use on this host (another hfl project? 'ss -ltnp' shows who); stop it and retry"
    fi
  done
}

summary() {
  echo
  compose $(profiles) ps
  echo
  cat <<EOF
hfl is up (project $PROJECT, profile $PROFILE). The trainers run the federation
and exit 0 when it is done ("Exited (0)" above); the aggregator stays up.
  attestation  grpc 127.0.0.1:7400 (mutual RA-TLS)
  aggregator   grpc 127.0.0.1:7401 (mutual RA-TLS; operators: GetStatus)
  Prometheus   http://127.0.0.1:9090  (targets: /targets, alerts: /alerts)
EOF
  if [ "${GRAFANA_ON:-0}" = 1 ]; then
    echo "  Grafana      http://127.0.0.1:3000  (admin / \$GRAFANA_ADMIN_PASSWORD, dashboard 'hfl federation')"
  else
    echo "  Grafana      not started (image $GRAFANA_IMAGE unavailable); deploy/grafana has the dashboard"
  fi
  cat <<EOF
Follow:   $COMPOSE_BIN -p $PROJECT -f $COMPOSE_FILE logs -f trainer-1
Status:   make operator && (see docs/deployment.md: hfl operator-cert, hfl status, grpcurl)
Stop:     make down   (volumes kept; make down WIPE=1 removes them)
EOF
}

cmd_up() {
  case "$PROFILE" in simulated|sgx) ;; *) die "PROFILE must be simulated or sgx, not '$PROFILE'" ;; esac
  need_daemon
  check_ports
  choose_bases
  local t0 t1
  t0=$(date +%s)
  if [ "$PROFILE" = simulated ] && [ "${HFL_BUILD:-1}" = 0 ]; then
    local img
    for img in "${SIM_IMAGES[@]}"; do
      have_image "hfl-$img:$TAG" || die "HFL_BUILD=0 but there is no image hfl-$img:$TAG; build it with make up"
    done
    say "using the existing hfl-*:$TAG images (HFL_BUILD=0)"
  elif [ "$PROFILE" = simulated ]; then
    build_images
  else
    local svc
    for svc in attestation aggregator trainer; do
      have_image "hfl-sgx-$svc:${HFL_SGX_IMAGE_TAG:-1}" \
        || die "no image hfl-sgx-$svc:${HFL_SGX_IMAGE_TAG:-1}; build and sign them first: make sgx-images (docs/deployment.md)"
    done
    [ -e /dev/sgx_enclave ] || die "no /dev/sgx_enclave on this host: the sgx profile needs an SGX host (docs/deployment.md); use PROFILE=simulated"
  fi
  t1=$(date +%s)
  say "starting profile $PROFILE (project $PROJECT); waits until attestation and aggregator are healthy"
  # shellcheck disable=SC2046,SC2086  # HFL_SERVICES is a list of names
  if ! compose $(profiles) up -d --no-build ${HFL_SERVICES:-} 2>&1 | tee "$TMPD/up.log"; then
    local stale="" boot cid
    boot=$(project_containers_of sim-bootstrap)
    if [ -n "$boot" ]; then
      stale=$($DOCKER logs "$boot" 2>&1 | grep -o "STALE VOLUME: .*" | head -1 || true)
    fi
    if [ -z "$stale" ]; then
      echo >&2
      compose $(profiles) ps >&2 || true
      for cid in $(project_containers); do
        echo "--- last log lines of $($DOCKER inspect --format '{{index .Config.Labels "com.docker.compose.service"}}' "$cid")" >&2
        $DOCKER logs --tail 15 "$cid" 2>&1 | cut -c1-300 >&2 || true
      done
    fi
    compose --profile simulated --profile sgx --profile grafana down --remove-orphans >/dev/null 2>&1 || true
    if [ -n "$stale" ]; then
      die "the ${PROJECT}_sim-platform volume is from another hfl version (${stale#STALE VOLUME: }); remove the old federation with 'make down WIPE=1' (its sealed state goes too), then make up"
    fi
    die "compose up failed (output above); what it had started is removed again, volumes kept"
  fi
  say "started in $(($(date +%s) - t1)) s (images: $((t1 - t0)) s)"
  summary
}

cmd_down() {
  need_daemon
  local extra=()
  [ "${WIPE:-0}" = 1 ] && extra=(--volumes)
  compose --profile simulated --profile sgx --profile grafana down --remove-orphans "${extra[@]}"
  if [ "${WIPE:-0}" = 1 ]; then
    say "removed project $PROJECT's containers, network and volumes"
  else
    say "removed project $PROJECT's containers and network; volumes kept (make down WIPE=1 removes them)"
  fi
}

cmd_operator() {
  # The operator's files, out of the volumes: key.pem (sim-operator volume),
  # the policy and the simulated platform's public root and collateral. Not
  # the platform's private keys: hfl operator-cert needs only its root.
  # `docker cp` from the (exited) sim-bootstrap container, which mounts both
  # volumes: no new container (on vfs that would copy a 2 GB image).
  need_daemon
  local out=${HFL_OPERATOR_OUT:-build/operator} cid
  cid=$(project_containers_of sim-bootstrap)
  [ -n "$cid" ] || die "no sim-bootstrap container in project $PROJECT: run make up first"
  mkdir -p "$out/operator" "$out/sim/platform"
  chmod 700 "$out" "$out/operator"
  $DOCKER cp "$cid:/operator/key.pem" "$out/operator/key.pem"
  chmod 600 "$out/operator/key.pem"
  $DOCKER cp "$cid:/sim/policy.toml" "$out/sim/policy.toml"
  $DOCKER cp "$cid:/sim/platform/root_ca.pem" "$out/sim/platform/root_ca.pem"
  rm -rf "$out/sim/platform/collateral"
  $DOCKER cp "$cid:/sim/platform/collateral" "$out/sim/platform/collateral"
  say "wrote $out/operator/key.pem, $out/sim/policy.toml, $out/sim/platform/{root_ca.pem,collateral/}"
  cat <<EOF
Next (with the README's .venv):
  .venv/bin/hfl operator-cert --operator-dir $out/operator --attestation 127.0.0.1:7400 \\
      --policy $out/sim/policy.toml --sim-platform $out/sim/platform
  .venv/bin/hfl status --aggregator 127.0.0.1:7401 --operator-dir $out/operator \\
      --policy $out/sim/policy.toml --sim-platform $out/sim/platform
  grpcurl -cacert $out/operator/ca.pem -cert $out/operator/cert.pem -key $out/operator/key.pem \\
      -authority aggregator.hfl.internal 127.0.0.1:7401 hfl.v1.AggregatorService/GetStatus
EOF
}

cmd_party() {
  # What one party's trainer needs, out of the simulated deployment's volumes, into
  # $HFL_PARTY_OUT (default build/parties/<party>): the agreed policy, plan and initial
  # weights, this party's own key (its party-N-key volume), and a copy of the simulated
  # platform standing in for the party's own CPU, with a sealing secret of its own.
  # Nothing of another party, of the operator or of a central service's state.
  need_daemon
  local party=${HFL_PARTY_NAME:-}
  [[ "$party" =~ ^party-[0-9]+$ ]] \
    || die "give the party: make party PARTY=party-1 (the simulated profile enrols party-1 and party-2)"
  local out=${HFL_PARTY_OUT:-build/parties/$party} cid
  cid=$(project_containers_of sim-bootstrap)
  [ -n "$cid" ] || die "no sim-bootstrap container in project $PROJECT: run make up first"
  rm -rf "$out"
  mkdir -p "$out"
  chmod 700 "$out"
  $DOCKER cp "$cid:/parties/$party/party.key.pem" "$out/key.pem" 2>/dev/null \
    || die "no key for $party in its volume (the simulated profile enrols party-1 and party-2)"
  $DOCKER cp "$cid:/sim/policy.toml" "$out/policy.toml"
  $DOCKER cp "$cid:/sim/plan.toml" "$out/plan.toml"
  $DOCKER cp "$cid:/sim/initial_weights.npz" "$out/initial_weights.npz"
  $DOCKER cp "$cid:/sim/platform" "$out/platform"
  rm -f "$out/platform/sealing_secret"
  head -c 32 /dev/urandom >"$out/platform/sealing_secret"
  chmod 600 "$out/key.pem" "$out/platform/sealing_secret"
  # The trainer image runs as uid 10001 (hfl): it must read these files.
  if [ "$(id -u)" = 0 ]; then chown -R 10001:10001 "$out"; fi
  say "wrote $out/{policy.toml,plan.toml,initial_weights.npz,key.pem,platform/} for $party"
  [ "$(id -u)" = 0 ] || say "the trainer runs as uid 10001: sudo chown -R 10001:10001 $out"
}

trainer_compose() {
  $COMPOSE_BIN -p "$TRAINER_PROJECT" -f deploy/compose.trainer.yaml "$@"
}

trainer_settings() {
  export HFL_TRAINER_PARTY=${HFL_TRAINER_PARTY:-}
  [ -n "$HFL_TRAINER_PARTY" ] || die "give the party: make $CMD PARTY=party-1"
  TRAINER_PROJECT=${HFL_TRAINER_PROJECT:-hfl-$HFL_TRAINER_PARTY}
  export HFL_TRAINER_PARTY_DIR=${HFL_TRAINER_PARTY_DIR:-build/parties/$HFL_TRAINER_PARTY}
  export HFL_TRAINER_OUTPUT=${HFL_TRAINER_OUTPUT:-build/parties/$HFL_TRAINER_PARTY-model}
  export HFL_TRAINER_IMAGE=${HFL_TRAINER_IMAGE:-hfl-trainer:$TAG}
  export HFL_TRAINER_DATA=${HFL_TRAINER_DATA:-$PWD/deploy/data}
  export HFL_TRAINER_AGGREGATOR=${HFL_TRAINER_AGGREGATOR:-}
  export HFL_TRAINER_ATTESTATION=${HFL_TRAINER_ATTESTATION:-}
}

abspath() { (cd "$1" && pwd); }

cmd_trainer_up() {
  need_daemon
  trainer_settings
  local d=$HFL_TRAINER_PARTY_DIR f
  [ -d "$d" ] || die "no party directory $d; make party PARTY=$HFL_TRAINER_PARTY writes one from a simulated deployment (or give PARTY_DIR=...)"
  for f in policy.toml plan.toml key.pem; do
    [ -s "$d/$f" ] || die "$d/$f is missing: a party directory holds policy.toml, plan.toml, initial_weights.npz, key.pem (and platform/ in simulation)"
  done
  [ -n "$HFL_TRAINER_AGGREGATOR" ] || die "give the aggregator's public address: AGGREGATOR=host:7401"
  [ -n "$HFL_TRAINER_ATTESTATION" ] || die "give the attestation service's public address: ATTESTATION=host:7400"
  [ -d "$HFL_TRAINER_DATA" ] || die "no data directory $HFL_TRAINER_DATA (DATA=...)"
  have_image "$HFL_TRAINER_IMAGE" \
    || die "no image $HFL_TRAINER_IMAGE; make up builds hfl-trainer, make trainer-image PROJECT=DIR a project's"
  mkdir -p "$HFL_TRAINER_OUTPUT"
  if [ "$(id -u)" = 0 ]; then chown 10001:10001 "$HFL_TRAINER_OUTPUT"; fi
  # compose resolves relative bind paths against the compose file's directory: absolute ones
  HFL_TRAINER_PARTY_DIR=$(abspath "$d")
  HFL_TRAINER_OUTPUT=$(abspath "$HFL_TRAINER_OUTPUT")
  HFL_TRAINER_DATA=$(abspath "$HFL_TRAINER_DATA")
  say "starting $HFL_TRAINER_PARTY's trainer ($HFL_TRAINER_IMAGE, project $TRAINER_PROJECT) for aggregator $HFL_TRAINER_AGGREGATOR"
  trainer_compose up -d --no-build || die "compose up of $HFL_TRAINER_PARTY's trainer failed (output above)"
  cat <<EOF
$HFL_TRAINER_PARTY's trainer is up (project $TRAINER_PROJECT); it exits 0 when the federation is done.
  model:   $HFL_TRAINER_OUTPUT/ (model.keras, provenance.json, export-manifest.json: hfl verify-export)
  follow:  $COMPOSE_BIN -p $TRAINER_PROJECT -f deploy/compose.trainer.yaml logs -f trainer
  stop:    make trainer-down PARTY=$HFL_TRAINER_PARTY   (WIPE=1 removes its state volume)
EOF
}

cmd_trainer_down() {
  need_daemon
  trainer_settings
  local extra=()
  [ "${WIPE:-0}" = 1 ] && extra=(--volumes)
  # compose interpolates the whole file even to stop it: placeholders for what it requires.
  HFL_TRAINER_AGGREGATOR=${HFL_TRAINER_AGGREGATOR:-unused:0} \
    HFL_TRAINER_ATTESTATION=${HFL_TRAINER_ATTESTATION:-unused:0} \
    HFL_TRAINER_PARTY_DIR=/nonexistent HFL_TRAINER_OUTPUT=/nonexistent \
    trainer_compose down --remove-orphans "${extra[@]}"
  if [ "${WIPE:-0}" = 1 ]; then
    say "removed $HFL_TRAINER_PARTY's trainer and its state volume (project $TRAINER_PROJECT)"
  else
    say "removed $HFL_TRAINER_PARTY's trainer (project $TRAINER_PROJECT); its state volume is kept"
  fi
}

CMD=${1:-}
# Build and start logs stay where the user can read them (build/ is git-ignored).
TMPD=build/compose
mkdir -p "$TMPD"
case "$CMD" in
  up) cmd_up ;;
  down) cmd_down ;;
  operator) cmd_operator ;;
  party) cmd_party ;;
  trainer-up) cmd_trainer_up ;;
  trainer-down) cmd_trainer_down ;;
  *) echo "usage: $0 up|down|operator|party|trainer-up|trainer-down" >&2; exit 2 ;;
esac
