# Docker Compose deployment. Included from the root Makefile.
#
#   make up                      simulated TEE: checks, builds the images, starts everything
#   make up PROFILE=sgx          SGX enclaves (images from `make sgx-images`)
#   make down                    stop and remove the containers (volumes are kept)
#   make down WIPE=1             ... and the volumes: the next `make up` starts a new federation
#   make operator                copy the operator key, policy and platform root out of the
#                                volumes into build/operator (for hfl operator-cert, grpcurl)
#   sudo make base-images        hfl's own base images from Debian packages (offline hosts)
#   make sgx-images SGX_SIGNING_KEY=~/.config/gramine/enclave-key.pem PCCS_URL=https://...
#                                build and sign the three SGX images (BuildKit secret)
#
# deploy/compose.sh does the work: `docker compose` (v2) when present, else
# `docker-compose` (1.29); BuildKit when the client has it, else the classic
# builder. docs/deployment.md has what `make up` prints and how long it takes.

PROFILE ?= simulated
HFL_PROJECT ?= hfl
HFL_IMAGE_TAG ?= dev
SGX_SERVICES ?= attestation aggregator trainer
HFL_ISVSVN ?= 1
HFL_SGX_IMAGE_TAG ?= $(HFL_ISVSVN)
PCCS_URL ?= https://localhost:8081/sgx/certification/v4/
USE_SECURE_CERT ?= true
SGX_SIGNING_KEY ?= $(HOME)/.config/gramine/enclave-key.pem
COMPOSE_SH := deploy/compose.sh
export PROFILE HFL_PROJECT HFL_IMAGE_TAG HFL_SGX_IMAGE_TAG

.PHONY: up down operator base-images sgx-images

up:
	@$(COMPOSE_SH) up

down:
	@$(COMPOSE_SH) down

operator:
	@$(COMPOSE_SH) operator

base-images:
	@deploy/base/build-base-images.sh

sgx-images:
	@test -r "$(SGX_SIGNING_KEY)" || { \
		echo "make sgx-images: no enclave signing key at $(SGX_SIGNING_KEY) (SGX_SIGNING_KEY=...)"; exit 2; }
	@set -e; for svc in $(SGX_SERVICES); do \
		DOCKER_BUILDKIT=1 docker build -f deploy/docker/Dockerfile.sgx \
			--build-arg SERVICE=$$svc \
			--build-arg ISVSVN=$(HFL_ISVSVN) \
			--build-arg PCCS_URL=$(PCCS_URL) \
			--build-arg USE_SECURE_CERT=$(USE_SECURE_CERT) \
			--secret id=sgx_signing_key,src=$(SGX_SIGNING_KEY) \
			-t hfl-sgx-$$svc:$(HFL_SGX_IMAGE_TAG) . ; \
	done
