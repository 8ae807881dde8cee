"""The Kubernetes manifests: valid against the API schemas (no cluster runs here), and
consistent with the daemon (probe ports and service, drain timeout, labels)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((MANIFESTS / name).read_text())
    return doc


@pytest.mark.parametrize(
    "name",
    [
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "pvc.yaml",
        "fill-hf-cache-job.yaml",
        "networkpolicy.yaml",
    ],
)
def test_manifest_is_valid_against_the_api_schema(name: str) -> None:
    kubernetes_validate.validate(load(name), K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load("kustomization.yaml")["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def test_a_typo_is_caught() -> None:
    broken = load("deployment.yaml")
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_matches_the_daemon() -> None:
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["LMSERVE_PORT"])
    assert env["LMSERVE_HOST"] == "0.0.0.0"
    assert pod["terminationGracePeriodSeconds"] > float(env["LMSERVE_DRAIN_TIMEOUT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port
    assert container["readinessProbe"]["grpc"]["service"] == "lmserve.v1.Generator"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_service_is_headless_and_selects_the_pods() -> None:
    service, deployment = load("service.yaml"), load("deployment.yaml")
    assert service["spec"]["clusterIP"] == "None"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _mounts(pod: dict[str, Any], claim: str) -> list[dict[str, Any]]:
    """The volume mounts of ``pod``'s containers that mount PersistentVolumeClaim ``claim``."""
    volumes = {
        v["name"]
        for v in pod["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    }
    return [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in volumes]


def test_the_cache_volume_is_filled_by_the_job_and_read_by_every_pod() -> None:
    pvc = load("pvc.yaml")
    claim = pvc["metadata"]["name"]
    job_pod = load("fill-hf-cache-job.yaml")["spec"]["template"]["spec"]
    deployment = load("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    # The Job writes it, the replicas (on any node) read it: only ReadWriteMany allows both.
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (writer,) = _mounts(job_pod, claim)
    assert not writer.get("readOnly", False)
    (reader,) = _mounts(pod, claim)
    assert reader["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == reader["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True

    # It downloads the model the replicas serve, into the HF_HOME they read it from.
    (download,) = job_pod["containers"]
    (server,) = pod["containers"]
    job_env = {e["name"]: e["value"] for e in download["env"]}
    env = {e["name"]: e["value"] for e in server["env"]}
    assert download["command"][:2] == ["hf", "download"]
    # `hf` is huggingface_hub's command, which the [server] extra installs (as in the image).
    hf = Path(sys.executable).with_name("hf")
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "REPO_ID" in usage.stdout, usage.stderr
    assert download["command"][2] == env["LMSERVE_MODEL"]
    assert job_env["HF_HOME"] == env["HF_HOME"] == writer["mountPath"] == reader["mountPath"]
    assert download["image"] == server["image"]


def test_the_job_s_pod_is_never_taken_for_a_replica() -> None:
    job_labels = load("fill-hf-cache-job.yaml")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        load("service.yaml")["spec"]["selector"],
        load("pdb.yaml")["spec"]["selector"]["matchLabels"],
        load("deployment.yaml")["spec"]["selector"]["matchLabels"],
    ):
        assert not selector.items() <= job_labels.items(), selector


def test_the_plaintext_pods_are_guarded_by_a_network_policy() -> None:
    """The pods serve plaintext without a token on their addresses; the NetworkPolicy must
    select them and let callers reach their two ports only from chosen sources."""
    pod = load("deployment.yaml")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "LMSERVE_TLS_CERT" not in env and "LMSERVE_AUTH_TOKEN_FILE" not in env
    policy = load("networkpolicy.yaml")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    assert all(rule["from"] for rule in policy["ingress"]), "a rule open to every source"
    allowed = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert allowed == {port["name"] for port in container["ports"]} == {"grpc", "metrics"}
    # Prometheus scrapes from another pod: /metrics must leave its loopback default.
    assert env["LMSERVE_METRICS_HOST"] == "0.0.0.0"
    assert int(env["LMSERVE_METRICS_PORT"]) == next(
        p["containerPort"] for p in container["ports"] if p["name"] == "metrics"
    )


def test_the_deployment_runs_the_scheduler_readme_recommends() -> None:
    readme = (MANIFESTS.parent.parent / "README.md").read_text()
    assert (
        "Switch to `--scheduler continuous`" in readme or "use `--scheduler continuous`" in readme
    )
    (container,) = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LMSERVE_SCHEDULER"] == "continuous"


# The files of the Hub's gpt2 repository (what `hf download gpt2` fetched in full: 5 formats
# of the weights, about 3 GB).
GPT2_REPO = [
    ".gitattributes", "64-8bits.tflite", "64-fp16.tflite", "64.tflite", "README.md",
    "config.json", "flax_model.msgpack", "generation_config.json", "merges.txt",
    "model.safetensors", "onnx/config.json", "onnx/decoder_model.onnx",
    "onnx/decoder_model_merged.onnx", "onnx/decoder_with_past_model.onnx",
    "onnx/generation_config.json", "onnx/merges.txt", "onnx/special_tokens_map.json",
    "onnx/tokenizer.json", "onnx/tokenizer_config.json", "onnx/vocab.json",
    "pytorch_model.bin", "rust_model.ot", "tf_model.h5", "tokenizer.json",
    "tokenizer_config.json", "vocab.json",
]  # fmt: skip


def test_the_fill_job_downloads_only_what_the_daemon_loads(tiny_model_dir: Path) -> None:
    from huggingface_hub.utils import filter_repo_objects

    (container,) = load("fill-hf-cache-job.yaml")["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["hf", "download", "gpt2"]
    options = command[3:]
    assert options[0::2] == ["--include"] * (len(options) // 2)
    patterns = options[1::2]
    fetched = set(filter_repo_objects(GPT2_REPO, allow_patterns=patterns))
    needed = {"config.json", "generation_config.json", "model.safetensors", "vocab.json"}
    assert needed | {"merges.txt", "tokenizer.json", "tokenizer_config.json"} <= fetched
    big = {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "rust_model.ot"}
    assert not fetched & big and not any(f.endswith((".onnx", ".tflite")) for f in fetched)
    # Every file of a checkpoint the daemon loads (make-test-model writes one) would be fetched.
    files = [p.name for p in tiny_model_dir.iterdir() if not p.name.startswith("LICENSE")]
    assert set(filter_repo_objects(files, allow_patterns=patterns)) == set(files)
