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
