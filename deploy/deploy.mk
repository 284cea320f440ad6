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
HFL_COMPOSE_PROJECT ?= hfl
HFL_IMAGE_TAG ?= dev
HFL_ISVSVN ?= 1
HFL_SGX_IMAGE_TAG ?= $(HFL_ISVSVN)
PCCS_URL ?= https://localhost:8081/sgx/certification/v4/
USE_SECURE_CERT ?= true
SGX_SIGNING_KEY ?= $(HOME)/.config/gramine/enclave-key.pem
COMPOSE_SH := deploy/compose.sh
export PROFILE HFL_COMPOSE_PROJECT HFL_IMAGE_TAG HFL_SGX_IMAGE_TAG

.PHONY: up down operator base-images sgx-images

up:
	@$(COMPOSE_SH) up

down:
	@$(COMPOSE_SH) down

operator:
	@$(COMPOSE_SH) operator

base-images:
	@deploy/base/build-base-images.sh

# Two stages, one command: deploy/sgx-images.sh builds and signs attestation
# and aggregator (and, when the policy has [roles.relay], the relay FROM the
# aggregator image) with the agreed policy, pins their MRENCLAVEs into the
# trainers' policy (deploy/config/policy.trainer.toml), then builds and signs
# the trainer with it (docs/deployment.md, "Signing and the policy").
sgx-images:
	@SGX_SIGNING_KEY="$(SGX_SIGNING_KEY)" HFL_ISVSVN="$(HFL_ISVSVN)" HFL_SGX_IMAGE_TAG="$(HFL_SGX_IMAGE_TAG)" \
		PCCS_URL="$(PCCS_URL)" USE_SECURE_CERT="$(USE_SECURE_CERT)" \
		GRAMINE_BUILD="$(GRAMINE_BUILD)" GRAMINE_POLICY_PY="$(GRAMINE_POLICY_PY)" deploy/sgx-images.sh
