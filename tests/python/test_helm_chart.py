"""The Helm chart in helm/apex, without a helm binary or a cluster.

Renders the chart with the Helm v4 SDK library (helm-python-sdk) for the default values, HA
(3 hubs on the chart's Redis, with every optional object on) and DaemonSet nodes; lints it
strictly; validates every rendered manifest strictly (unknown fields rejected) against the
Kubernetes schema of kubernetes-validate's latest version; runs the PrometheusRule's rules
through `promtool check rules`; and gives the rendered hub.toml and node.toml (with the
environment the pods get) to `apex-hub --check-config` and `apex-node --check-config`.

Usage: test_helm_chart.py APEX_HUB_BINARY APEX_NODE_BINARY (tests/tests/helm_chart.rs).
Prints `N passed, 0 failed` and exits 0, or the failures and exits 1.
"""

import json
import os
import subprocess
import sys
import tempfile
import traceback

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "apex")
K8S = kubernetes_validate.latest_version()
HUB_BIN, NODE_BIN = sys.argv[1], sys.argv[2]

HA = {
    "hub": {
        "replicas": 3,
        "autoscaling": {"enabled": True},
        "config": {
            "log_level": "debug",
            "llm": {"providers": [{"name": "mock", "kind": "mock"}]},
            "node_llm": {"requests_per_minute": 120},
        },
    },
    "redis": {"enabled": True},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["apex.example.com"], "secretName": "apex-tls"}]},
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    },
    "nodes": {"config": {"max_concurrent_tasks": 8, "allow_programs": ["uname"]}},
}
DAEMONSET = {
    "nodes": {
        "deployment": {"enabled": False},
        "daemonset": {"enabled": True},
        "config": {"file_roots": ["/tmp"], "drain_timeout_ms": 20000},
        "volumes": [{"name": "files", "hostPath": {"path": "/srv/apex", "type": "DirectoryOrCreate"}}],
        "volumeMounts": [{"name": "files", "mountPath": "/srv/apex", "readOnly": True}],
    }
}
CRD_GROUPS = ("monitoring.coreos.com/",)


def render(values):
    chart = helm.Chart.load(CHART)
    chart.validate_schema(chart.merge_values(values))
    out = chart.render(values, name="apex", namespace="apex", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, out


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]["spec"]


def validate_all(docs):
    for d in docs:
        name = f'{d["kind"]}/{d["metadata"]["name"]}'
        if d["apiVersion"].startswith(CRD_GROUPS):
            # No schema for the Prometheus operator's CRDs here: checked below instead.
            continue
        kubernetes_validate.validate(d, K8S, strict=True)
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == "apex", name


def check_pods(docs):
    for owner, spec in pod_specs(docs):
        name = f'{owner["kind"]}/{owner["metadata"]["name"]}'
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"] and c["resources"]["limits"], name
            # Keys only from Secrets, never on the command line.
            assert not any("key" in a.lower() and "=" in a for a in c.get("args", [])), name


def env_of(container):
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = "secret-value-1234"
    # Kubernetes expands $(VAR) from earlier variables.
    for k, v in env.items():
        for k2, v2 in env.items():
            v = v.replace(f"$({k2})", v2)
        env[k] = v
    return env


def check_configs(docs):
    maps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    with tempfile.TemporaryDirectory() as tmp:
        for owner, spec in pod_specs(docs):
            comp = owner["metadata"]["labels"].get("app.kubernetes.io/component")
            if comp not in ("hub", "node", "node-daemonset"):
                continue
            c = spec["containers"][0]
            cm = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
            (file_name, text), = maps[cm]["data"].items()
            path = os.path.join(tmp, file_name)
            with open(path, "w") as f:
                f.write(text)
            binary = HUB_BIN if comp == "hub" else NODE_BIN
            env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, **env_of(c)}
            run = subprocess.run(
                [binary, "--check-config", *c["args"][:1], path],
                env=env, capture_output=True, text=True, timeout=30,
            )
            assert run.returncode == 0, f"{comp}: {file_name} refused: {run.stderr}\n{text}"
            assert run.stdout.strip() == "configuration ok", run.stdout


def grace_above_drain(docs, delay_ms, drain_ms):
    (hub,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              and d["metadata"]["labels"]["app.kubernetes.io/component"] == "hub"]
    grace = hub["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace * 1000 > delay_ms + drain_ms, (grace, delay_ms, drain_ms)
    return hub


def test_lint():
    report = helm.lint(CHART, strict=True)
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert not bad and not report["errors"], report


def test_default_values():
    docs, _ = render(None)
    validate_all(docs)
    check_pods(docs)
    check_configs(docs)
    hub = grace_above_drain(docs, 5000, 0)
    assert hub["kind"] == "StatefulSet" and hub["spec"]["replicas"] == 1
    assert hub["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    c = hub["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert "lifecycle" not in c, "no preStop: the hub's shutdown_delay_ms does its job"
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget",
                     "Secret", "Service", "Service", "StatefulSet"], kinds


def test_ha_values():
    docs, _ = render(HA)
    validate_all(docs)
    check_pods(docs)
    check_configs(docs)
    hub = grace_above_drain(docs, 5000, 10000)
    assert hub["kind"] == "Deployment"
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == hub["metadata"]["name"]
    toml = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "apex-hub")["data"]["hub.toml"]
    assert 'hub_mode = "shared"' in toml and 'store = "redis://apex-redis:6379/0"' in toml, toml
    (node,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "apex-node"]
    hubs = env_of(node["spec"]["template"]["spec"]["containers"][0])["APEX_NODE_HUB"]
    assert hubs == "[ws://apex-hub:8088, ws://apex-hub-headless:8088]", hubs
    (ing,) = by_kind(docs, "Ingress")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    (rule,) = by_kind(docs, "PrometheusRule")
    with open(os.path.join(ROOT, "deploy/prometheus/alerts.yml")) as f:
        assert rule["spec"] == yaml.safe_load(f), "PrometheusRule differs from deploy/prometheus/alerts.yml"
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(rule["spec"], f)
        f.flush()
        run = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    dash = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "apex-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    with open(os.path.join(ROOT, "deploy/grafana/apex-dashboard.json")) as f:
        assert json.loads(dash["data"]["apex-dashboard.json"]) == json.load(f)
    assert len(by_kind(docs, "StatefulSet")) == 1  # the chart's Redis


def test_daemonset_values():
    docs, _ = render(DAEMONSET)
    validate_all(docs)
    check_pods(docs)
    check_configs(docs)
    (ds,) = by_kind(docs, "DaemonSet")
    assert [d for d in by_kind(docs, "Deployment")] == []
    sel = ds["spec"]["selector"]["matchLabels"]
    assert sel["app.kubernetes.io/component"] == "node-daemonset", sel


def test_shared_mode_needs_redis_and_typos_fail():
    try:
        render({"hub": {"replicas": 2}})
        raise AssertionError("2 hubs without Redis rendered")
    except helm.HelmError as e:
        assert "redis.url" in str(e), e
    for typo in ({"hub": {"replica": 2}}, {"hub": {"config": {"shutdown_delay": 1}}},
                 {"nodes": {"config": {"file_root": ["/tmp"]}}}):
        try:
            render(typo)
            raise AssertionError(f"{typo} accepted")
        except helm.HelmError:
            pass


def test_chart_files_are_the_deploy_files():
    for chart_file, source in (("files/alerts.yml", "deploy/prometheus/alerts.yml"),
                               ("files/apex-dashboard.json", "deploy/grafana/apex-dashboard.json")):
        with open(os.path.join(CHART, chart_file), "rb") as a, open(os.path.join(ROOT, source), "rb") as b:
            assert a.read() == b.read(), f"helm/apex/{chart_file} differs from {source}: copy it again"


def main():
    print(f"Kubernetes schema {K8S} (kubernetes-validate {kubernetes_validate.__version__}), Helm SDK {helm.helm_sdk_version()}")
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    failed = 0
    for t in tests:
        try:
            t()
            print(f"ok   {t.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL {t.__name__}\n{traceback.format_exc()}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
