"""The cluster manifests validate against KubeRay's CRD schemas (ray.io/v1), offline."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "fixtures" / "kuberay"


def _validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / f"{kind}-v1.json").read_text()))


@pytest.mark.parametrize("path,kind", [("cluster/raycluster.yaml", "raycluster"), ("cluster/rayjob.yaml", "rayjob")])
def test_manifest_matches_kuberay_schema(path, kind):
    doc = yaml.safe_load((ROOT / path).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"].lower() == kind
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_catches_a_broken_manifest():
    doc = yaml.safe_load((ROOT / "cluster/raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    assert list(_validator("raycluster").iter_errors(doc))


def test_rayjob_runtime_env_is_yaml_with_the_gpu_stack():
    doc = yaml.safe_load((ROOT / "cluster/rayjob.yaml").read_text())
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert any(p.startswith("vllm==") for p in env["pip"])
    assert "apr_ray.cli run" in doc["spec"]["entrypoint"]


def _docs(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("path", ["cluster/raycluster.yaml", "cluster/rayjob.yaml"])
def test_every_ray_container_runs_with_token_auth_and_secrets_from_kubernetes(path):
    (doc,) = _docs(path)
    for container in _containers(doc):
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        for name in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[name]["valueFrom"], (container["name"], name)  # never a literal
            assert "value" not in env[name]
    head = doc["spec"].get("rayClusterSpec", doc["spec"])["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard and job API stay inside


def test_mlflow_server_uses_basic_auth_from_a_secret_and_is_not_exposed():
    docs = {d["kind"]: d for d in _docs("cluster/mlflow.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    env = _env(container)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    assert "externalIPs" not in docs["Service"]["spec"]
    tracking = {e["value"] for c in _containers(_docs("cluster/raycluster.yaml")[0])
                for e in c["env"] if e["name"] == "MLFLOW_TRACKING_URI"}
    assert tracking == {f"http://{docs['Service']['metadata']['name']}.{docs['Service']['metadata']['namespace']}"
                        f".svc:{docs['Service']['spec']['ports'][0]['port']}"}


def test_no_manifest_holds_a_secret_value():
    for path in ("cluster/raycluster.yaml", "cluster/rayjob.yaml", "cluster/mlflow.yaml"):
        text = (ROOT / path).read_text().lower()
        for word in ("password:", "auth_token:", "token: "):
            assert word not in text.replace("key: auth_token", ""), (path, word)
