"""deploy/k8s/autoscaling: KEDA ScaledObjects scale agent pools on the metric the coordinator
really exports, for kinds the pools really run, with a key of its own for every pod."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from coordinator_agent.cli.main import build_parser
from coordinator_agent.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
AUTOSCALING = ROOT / "deploy" / "k8s" / "autoscaling"
METRIC = re.compile(r"(?<![\w:])(coordinator_[A-Za-z0-9_]*)(?![\w:])")
KIND_LABEL = re.compile(r'kind="([^"]+)"')


def objects(file: str, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc
            for doc in yaml.safe_load_all((AUTOSCALING / file).read_text())
            if doc and doc["kind"] == kind}


def exported_names() -> dict[str, set[str]]:
    """Gauge/counter/histogram name -> label names, from the coordinator's metrics container."""
    names = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            suffix = "_total" if metric._type == "counter" else ""
            names[metric._name + suffix] = set(metric._labelnames)
    return names


def test_each_scaled_object_follows_the_desired_agents_metric_of_its_pools_kind() -> None:
    pools = objects("pools.yaml", "StatefulSet")
    scaled = objects("scaledobjects.yaml", "ScaledObject")
    exported = exported_names()
    assert "coordinator_desired_agents" in exported
    assert exported["coordinator_desired_agents"] == {"kind"}
    assert scaled and set(scaled) == set(pools)
    parser = build_parser()
    for name, scaled_object in scaled.items():
        spec = scaled_object["spec"]
        target = spec["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("StatefulSet", name)
        pool = pools[name]
        container = pool["spec"]["template"]["spec"]["containers"][0]
        args = parser.parse_args(container["args"])
        assert args.command == "worker" and args.id == "$(POD_NAME)"
        assert spec["minReplicaCount"] == 0, "scale to zero"
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert METRIC.findall(query) == ["coordinator_desired_agents"], query
        assert KIND_LABEL.findall(query) == [args.kind], (query, args.kind)
        assert pool["metadata"]["labels"]["coordinator-agent/kind"] == args.kind
        # replicas = the coordinator's number: one pod per desired agent, from the first task.
        assert trigger["metadata"]["threshold"] == "1"
        assert trigger["metadata"]["activationThreshold"] == "0"


def test_every_pod_a_pool_may_run_has_a_key_of_its_own() -> None:
    pools = objects("pools.yaml", "StatefulSet")
    scaled = objects("scaledobjects.yaml", "ScaledObject")
    (secret,) = objects("pool-secret-template.yaml", "Secret").values()
    for name, pool in pools.items():
        pod = pool["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["COORDINATOR_KEYRING_PATH"]["value"] == "/secrets/agent/$(POD_NAME).json"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["keys"]["secret"]["secretName"] == secret["metadata"]["name"]
        replicas = scaled[name]["spec"]["maxReplicaCount"]
        for ordinal in range(replicas):
            assert f"{name}-{ordinal}.json" in secret["stringData"], (name, ordinal)
        assert pool["spec"]["replicas"] == 0, "KEDA decides"


def test_the_overlay_holds_the_base_and_the_pools() -> None:
    kustomization = yaml.safe_load((AUTOSCALING / "kustomization.yaml").read_text())
    assert kustomization["resources"][0] == ".."
    for resource in kustomization["resources"][1:]:
        assert (AUTOSCALING / resource).is_file(), resource
    assert "pool-secret-template.yaml" not in kustomization["resources"]
