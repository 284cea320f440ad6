# Docker Compose deployment. Included from the root Makefile.
#
#   make up                      simulated TEE: builds the images, starts everything
#   make up PROFILE=sgx          SGX enclaves (images from `make sgx-images`)
#   make down                    stop and remove the containers (volumes are kept)
#   make sgx-images SGX_SIGNING_KEY=~/.config/gramine/enclave-key.pem PCCS_URL=https://...
#                                build and sign the three SGX images (BuildKit secret)
#
# `docker compose` (v2) is used when present, else `docker-compose` (v1.28+).

PROFILE ?= simulated
COMPOSE_FILE_HFL := deploy/compose.yaml
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
SGX_SERVICES ?= attestation aggregator trainer
HFL_ISVSVN ?= 1
HFL_SGX_IMAGE_TAG ?= $(HFL_ISVSVN)
PCCS_URL ?= https://localhost:8081/sgx/certification/v4/
USE_SECURE_CERT ?= true
SGX_SIGNING_KEY ?= $(HOME)/.config/gramine/enclave-key.pem

.PHONY: up down sgx-images

up:
	@case "$(PROFILE)" in simulated|sgx) ;; \
		*) echo "make up: PROFILE must be simulated or sgx, not '$(PROFILE)'"; exit 2;; esac
	HFL_SGX_IMAGE_TAG=$(HFL_SGX_IMAGE_TAG) $(COMPOSE) -f $(COMPOSE_FILE_HFL) --profile $(PROFILE) up -d --build
	@echo "Prometheus: http://127.0.0.1:9090   Grafana: http://127.0.0.1:3000 (dashboard 'hfl')"

down:
	$(COMPOSE) -f $(COMPOSE_FILE_HFL) --profile simulated --profile sgx down

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
