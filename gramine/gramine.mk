# Gramine manifests, signing and the policy's expected identities.
# Included from the root Makefile; also run on its own inside the SGX image
# build (deploy/docker/Dockerfile.sgx): make -f gramine/gramine.mk manifests sign
#
#   make manifests   render gramine/<service>.manifest.template -> $(GRAMINE_BUILD)/hfl-<service>.manifest
#   make sign        gramine-sgx-sign each manifest with $(SGX_SIGNING_KEY); writes
#                    hfl-<service>.manifest.sgx, hfl-<service>.sig and hfl-<service>.sigstruct.json
#   make sgx-sigs    copy the .sig files out of the SGX images built by `make sgx-images`
#   make policy      $(GRAMINE_BUILD)/policy-roles.toml: the policy's [roles.*] tables
#                    from the .sig files (and policy-roles.mrsigner.toml without MRENCLAVE)
#
# `manifests` and `sign` need Gramine (gramine-manifest, gramine-sgx-sign) and the
# service installed at $(HFL_SGX_SITE): they are meant for the SGX image build.
# Template variables are named python_stdlib etc., never `python`: a -Dpython=...
# would hide the `python` helpers gramine-manifest injects into every template.

GRAMINE_ROOT ?= gramine
GRAMINE_BUILD ?= build/gramine
GRAMINE_SERVICES ?= attestation aggregator trainer relay
GRAMINE_LOG_LEVEL ?= error
GRAMINE_ARCH_LIBDIR ?= /lib/x86_64-linux-gnu
HFL_SGX_PYTHON ?= /usr/bin/python3.11
HFL_SGX_STDLIB ?= /usr/lib/python3.11
HFL_SGX_SITE ?= /opt/hfl/site
# Raise with every security fix; the policy's min_isv_svn follows it.
HFL_ISVSVN ?= 1
SGX_SIGNING_KEY ?= $(HOME)/.config/gramine/enclave-key.pem
HFL_SGX_IMAGE_TAG ?= $(HFL_ISVSVN)
# The Python that has hfl_common (the workspace's .venv when there is one).
GRAMINE_POLICY_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: manifests sign sgx-sigs policy

manifests:
	@command -v gramine-manifest >/dev/null 2>&1 || { \
		echo "make manifests: gramine-manifest is not installed here. Manifests are rendered"; \
		echo "inside the SGX image build: make sgx-images (deploy/deploy.mk), or install"; \
		echo "Gramine 1.8 (https://gramine.readthedocs.io) and the service at $(HFL_SGX_SITE)."; \
		exit 2; }
	@mkdir -p $(GRAMINE_BUILD)
	@set -e; \
	defs="$$($(HFL_SGX_PYTHON) $(GRAMINE_ROOT)/trusted_inputs.py --site $(HFL_SGX_SITE) \
		--python $(HFL_SGX_PYTHON) --stdlib $(HFL_SGX_STDLIB) \
		$(if $(HFL_PROJECT_DIR),--project $(HFL_PROJECT_DIR)))"; \
	for svc in $(GRAMINE_SERVICES); do \
		echo "gramine-manifest $(GRAMINE_ROOT)/$$svc.manifest.template -> $(GRAMINE_BUILD)/hfl-$$svc.manifest"; \
		gramine-manifest \
			-Dlog_level=$(GRAMINE_LOG_LEVEL) \
			-Darch_libdir=$(GRAMINE_ARCH_LIBDIR) \
			-Dentrypoint=$(HFL_SGX_PYTHON) \
			-Dpython_stdlib=$(HFL_SGX_STDLIB) \
			-Dsite_dir=$(HFL_SGX_SITE) \
			$$defs \
			-Disvsvn=$(HFL_ISVSVN) \
			$(GRAMINE_ROOT)/$$svc.manifest.template $(GRAMINE_BUILD)/hfl-$$svc.manifest; \
	done

sign:
	@command -v gramine-sgx-sign >/dev/null 2>&1 || { \
		echo "make sign: gramine-sgx-sign is not installed here; sign inside the SGX image"; \
		echo "build: make sgx-images SGX_SIGNING_KEY=/path/to/enclave-key.pem"; exit 2; }
	@test -r "$(SGX_SIGNING_KEY)" || { \
		echo "make sign: no signing key at $(SGX_SIGNING_KEY). The key holder creates it once"; \
		echo "with gramine-sgx-gen-private-key (RSA-3072, exponent 3) and keeps it off this repo."; \
		exit 2; }
	@set -e; for svc in $(GRAMINE_SERVICES); do \
		test -s $(GRAMINE_BUILD)/hfl-$$svc.manifest || { \
			echo "make sign: $(GRAMINE_BUILD)/hfl-$$svc.manifest is missing; run make manifests"; exit 2; }; \
		gramine-sgx-sign --key "$(SGX_SIGNING_KEY)" \
			--manifest $(GRAMINE_BUILD)/hfl-$$svc.manifest \
			--output $(GRAMINE_BUILD)/hfl-$$svc.manifest.sgx; \
		gramine-sgx-sigstruct-view --output-format json \
			$(GRAMINE_BUILD)/hfl-$$svc.sig $(GRAMINE_BUILD)/hfl-$$svc.sigstruct.json; \
		echo "signed hfl-$$svc:"; cat $(GRAMINE_BUILD)/hfl-$$svc.sigstruct.json; echo; \
	done

sgx-sigs:
	@command -v docker >/dev/null 2>&1 || { echo "make sgx-sigs: needs the docker client"; exit 2; }
	@mkdir -p $(GRAMINE_BUILD)
	@set -e; for svc in $(GRAMINE_SERVICES); do \
		cid=$$(docker create hfl-sgx-$$svc:$(HFL_SGX_IMAGE_TAG)); \
		docker cp $$cid:/opt/hfl/build/hfl-$$svc.sig $(GRAMINE_BUILD)/hfl-$$svc.sig; \
		docker cp $$cid:/opt/hfl/build/hfl-$$svc.sigstruct.json $(GRAMINE_BUILD)/hfl-$$svc.sigstruct.json; \
		docker rm $$cid >/dev/null; \
		echo "copied $(GRAMINE_BUILD)/hfl-$$svc.sig from hfl-sgx-$$svc:$(HFL_SGX_IMAGE_TAG)"; \
	done

policy:
	$(GRAMINE_POLICY_PY) -m hfl_common.sigstruct \
		$(foreach svc,$(GRAMINE_SERVICES),--role $(svc)=$(GRAMINE_BUILD)/hfl-$(svc).sig) \
		--out $(GRAMINE_BUILD)/policy-roles.toml
	$(GRAMINE_POLICY_PY) -m hfl_common.sigstruct --mrsigner-only \
		$(foreach svc,$(GRAMINE_SERVICES),--role $(svc)=$(GRAMINE_BUILD)/hfl-$(svc).sig) \
		--out $(GRAMINE_BUILD)/policy-roles.mrsigner.toml
	@echo "wrote $(GRAMINE_BUILD)/policy-roles.toml and policy-roles.mrsigner.toml;"
	@echo "merge the [roles.*] tables into the policy every party reviews (docs/deployment.md)."
