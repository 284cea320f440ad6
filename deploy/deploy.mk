# Docker Compose deployment. Included from the root Makefile.
#
#   make up                      simulated TEE: checks, builds the images, starts everything
#   make up PROFILE=sgx          SGX enclaves (images from `make sgx-images`)
#   make down                    stop and remove the containers (volumes are kept)
#   make down WIPE=1             ... and the volumes: the next `make up` starts a new federation
#   make operator                copy the operator key, policy and platform root out of the
#                                volumes into build/operator (for hfl operator-cert, grpcurl)
#   make party PARTY=party-1     copy what that party's own trainer needs (policy, plan,
#                                its key, the simulated platform) into build/parties/party-1
#   make trainer-up PARTY=party-1 AGGREGATOR=host:7401 ATTESTATION=host:7400 [DATA=dir]
#                                one organisation's trainer alone, its own compose project
#                                (deploy/compose.trainer.yaml); make trainer-down PARTY=...
#   make trainer-image PROJECT=path/to/project
#                                hfl-trainer-<name>:$(HFL_IMAGE_TAG): the trainer image plus a
#                                federation project at /opt/hfl/project/<name> (measured)
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

.PHONY: up down operator party trainer-up trainer-down trainer-image base-images sgx-images

up:
	@$(COMPOSE_SH) up

down:
	@$(COMPOSE_SH) down

operator:
	@$(COMPOSE_SH) operator

party:
	@HFL_PARTY_NAME="$(PARTY)" $(if $(PARTY_OUT),HFL_PARTY_OUT="$(PARTY_OUT)") $(COMPOSE_SH) party

# Settings left empty are not passed: deploy/compose.sh has the defaults.
TRAINER_ENV = HFL_TRAINER_PARTY="$(PARTY)" \
	$(if $(AGGREGATOR),HFL_TRAINER_AGGREGATOR="$(AGGREGATOR)") \
	$(if $(ATTESTATION),HFL_TRAINER_ATTESTATION="$(ATTESTATION)") \
	$(if $(PARTY_DIR),HFL_TRAINER_PARTY_DIR="$(PARTY_DIR)") \
	$(if $(DATA),HFL_TRAINER_DATA="$(DATA)") \
	$(if $(OUTPUT),HFL_TRAINER_OUTPUT="$(OUTPUT)") \
	$(if $(TRAINER_IMAGE),HFL_TRAINER_IMAGE="$(TRAINER_IMAGE)")

trainer-up:
	@$(TRAINER_ENV) $(COMPOSE_SH) trainer-up

trainer-down:
	@$(TRAINER_ENV) $(COMPOSE_SH) trainer-down

trainer-image:
	@$(if $(TRAINER_IMAGE),TRAINER_IMAGE="$(TRAINER_IMAGE)") deploy/trainer-image.sh "$(PROJECT)" $(IMAGE)

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
		GRAMINE_BUILD="$(GRAMINE_BUILD)" GRAMINE_POLICY_PY="$(GRAMINE_POLICY_PY)" \
		PROJECT="$(PROJECT)" deploy/sgx-images.sh
