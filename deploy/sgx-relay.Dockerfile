# hfl-sgx-relay: the relay enclave (gramine/relay.manifest.template: the
# aggregator's code in relay mode, ISV_PROD_ID 4, the root's address passed
# through as HFL_RELAY_UPSTREAM), built FROM the signed hfl-sgx-aggregator
# image of the same `make sgx-images` run: the same site directory, the same
# agreed policy (deploy/config/policy.toml, roles pinned by MRSIGNER, as for
# the root), plan and initial weights; only its own manifest, rendered and
# signed here, so it has its own MRENCLAVE. deploy/sgx-images.sh builds it
# after the aggregator and pins its MRENCLAVE into the trainers' policy as
# [roles.relay]. Build context: gramine/ (nothing else is needed).
#
#   docker buildx build -f deploy/sgx-relay.Dockerfile \
#       --build-arg AGGREGATOR_IMAGE=hfl-sgx-aggregator:1 --build-arg ISVSVN=1 \
#       --secret id=sgx_signing_key,src=$HOME/.config/gramine/enclave-key.pem \
#       -t hfl-sgx-relay:1 gramine
#
# The signing key is a BuildKit secret, as in deploy/docker/Dockerfile.sgx.
ARG AGGREGATOR_IMAGE=hfl-sgx-aggregator:1
FROM ${AGGREGATOR_IMAGE}
ARG ISVSVN=1
USER root
# The template of this checkout (the aggregator image has a copy of gramine/
# too; this one wins, so a relay is never signed from a stale template).
COPY relay.manifest.template /opt/hfl/gramine/relay.manifest.template
WORKDIR /opt/hfl
RUN make -f gramine/gramine.mk manifests GRAMINE_ROOT=gramine GRAMINE_BUILD=build \
        GRAMINE_SERVICES=relay HFL_ISVSVN="${ISVSVN}"
# The aggregator's enclave files are removed from this image's view: it can
# only start the relay enclave.
RUN --mount=type=secret,id=sgx_signing_key,required=true \
    make -f gramine/gramine.mk sign GRAMINE_ROOT=gramine GRAMINE_BUILD=build \
        GRAMINE_SERVICES=relay SGX_SIGNING_KEY=/run/secrets/sgx_signing_key \
 && test -s build/hfl-relay.sig \
 && rm -f build/hfl-aggregator.manifest build/hfl-aggregator.manifest.sgx \
        build/hfl-aggregator.sig build/hfl-aggregator.sigstruct.json
# The ENTRYPOINT (inherited) runs gramine-sgx /opt/hfl/build/hfl-${HFL_SERVICE}.
ENV HFL_SERVICE=relay
USER hfl
# Plain HTTP /readyz on the metrics port the relay manifest fixes, outside the enclave.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; p={'relay':9401}[os.environ['HFL_SERVICE']]; sys.exit(0 if u.urlopen('http://127.0.0.1:%d/readyz' % p, timeout=4).status == 200 else 1)"]
