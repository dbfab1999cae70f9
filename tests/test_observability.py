"""The shipped Prometheus rules and Grafana dashboard against what a real shim exports, and a real scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from migrator import playbook, registry, servers
from migrator.phases import Phase
from migrator.state import StateStore
from tests.conftest import write_playbook
from tests.helpers import start_cli, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "migrator.json"

# What operators are told to expect (issue 11): each must stay covered by an alert rule.
def _yaml(path: Path):
    return YAML(typ="safe").load(path.read_text())


REQUIRED_ALERTS = {
    "MigratorDivergencesRising", "MigratorDirtyKeys", "MigratorShadowFailures", "MigratorSideDown",
    "MigratorShimGenerationBehind", "MigratorMirrorQueueNearBound", "MigratorShimDown", "MigratorShimAbsent",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus; .ci/run installs it)")
    return path


def _series_names(family) -> set[str]:
    """The names PromQL sees for one metric family (a counter's _total, a histogram's _bucket/_sum/_count)."""
    if family.type == "counter":
        return {family.name + "_total"}
    if family.type == "histogram":
        return {family.name + s for s in ("_bucket", "_sum", "_count")}
    if family.type == "summary":
        return {family.name, family.name + "_sum", family.name + "_count"}
    return {family.name}


def _exported(env) -> dict[str, set[str]]:
    """Family name -> series names, read from a live ``/metrics`` scrape of the shim."""
    text = env.admin("/metrics").decode()
    return {f.name: _series_names(f) for f in text_string_to_metric_families(text)}


def _metric_names(expr: str) -> set[str]:
    """The migrator metric names a PromQL expression refers to."""
    return set(re.findall(r"\bmigrator_[a-zA-Z0-9_:]+", expr))


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


@pytest.fixture
def shim_env(server_factory, make_env):
    """A shim with its admin port in mirroring phase, after a little traffic."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"), shim={"mirror_queue_size": 1234})
    env.set_phase(Phase.COMPATIBLE)
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    for i in range(10):
        c.set(f"k{i}", i)
        c.get(f"k{i}")
    return env


def test_alert_rules_and_scrape_config_pass_promtool_check():
    """`promtool check config` accepts the lab's prometheus.yml and the alerts.yml it loads."""
    promtool = _tool("promtool")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    rules = [rule for g in _yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for rule in g["rules"]]
    assert len(rules) >= 9 and f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout


def test_alert_rules_pass_their_unit_tests():
    """`promtool test rules` passes, and every alert rule has a test in which it fires."""
    promtool = _tool("promtool")
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    rules = {rule["alert"] for g in _yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
             for rule in g["rules"]}
    assert rules >= REQUIRED_ALERTS, f"alert rules missing: {sorted(REQUIRED_ALERTS - rules)}"
    tests = _yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
    fired = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert rules <= fired, f"alert rules never shown firing in alerts_test.yml: {sorted(rules - fired)}"


def test_alert_rules_name_only_metrics_the_shim_exports(shim_env):
    """Every migrator metric an alert rule reads is one a running shim exports (a rename breaks no alert silently)."""
    exported = set().union(*_exported(shim_env).values())
    groups = _yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        unknown = _metric_names(rule["expr"]) - exported
        assert not unknown, f"alert {rule['alert']} reads {sorted(unknown)}, which the shim does not export"


def test_dashboard_has_a_panel_for_every_exported_metric(shim_env):
    """Each dashboard query names metrics a running shim exports, and each exported metric has a panel."""
    families = _exported(shim_env)
    exported = set().union(*families.values())
    exprs = _dashboard_exprs()
    assert exprs, "the dashboard has no queries"
    used: set[str] = set()
    for title, expr in exprs:
        names = _metric_names(expr)
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which the shim does not export"
        assert names or 'up{job="migrator-shim"' in expr, f"panel {title!r} queries no shim metric: {expr}"
        used |= names
    missing = sorted(f for f, series in families.items() if not series & used)
    assert not missing, f"exported metrics without a dashboard panel: {missing}"
    # The kinds of panel operators look for first (issue 11).
    titles = " / ".join(t for t, _ in exprs).lower()
    for word in ("phase", "throughput", "latency", "divergence", "dirty", "mirror queue", "connections"):
        assert word in titles, f"no dashboard panel about {word}"


def test_phase_side_and_queue_gauges_follow_the_shim(shim_env):
    """/metrics exports the generation read and applied, each side's reachability and the mirror queue's bound."""
    env = shim_env
    gen = env.set_phase(Phase.READS_ON_TARGET)

    def sample(name: str, **labels) -> float | None:
        for f in text_string_to_metric_families(env.admin("/metrics").decode()):
            for s in f.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return None

    assert sample("migrator_shim_state_generation", phase="reads-on-target") == gen
    assert sample("migrator_shim_applied_generation", phase="reads-on-target") == gen
    assert sample("migrator_shim_mirror_queue_limit") == 1234
    assert sample("migrator_shim_side_up", side="source") == 1
    assert sample("migrator_shim_side_up", side="target") == 1
    # The target goes away while no client is connected: the background probe notices it.
    for c in env.clients:
        c.close()
    wait_for(lambda: sample("migrator_shim_connections") == 0, timeout=5, what="clients gone")
    env.target.stop()
    # Probed about every 0.5 s: reported within a few seconds.
    wait_for(lambda: sample("migrator_shim_side_up", side="target") == 0, timeout=5, what="target reported down")
    assert sample("migrator_shim_side_up", side="source") == 1


def test_workers_supervisor_exports_the_same_metrics(shim_env, server_factory, tmp_path):
    """With --workers 2 the supervisor's /metrics has the single shim's metrics, the laggard's generation and both bounds."""
    single = set(_exported(shim_env))
    (tmp_path / "workers").mkdir()
    pb_path = write_playbook(tmp_path / "workers" / "migrator.yaml", shim_env.source.url, shim_env.target.url,
                             shim={"mirror_queue_size": 500})
    pb = playbook.load(pb_path)
    proc = start_cli("shim", "--workers", "2", playbook=pb_path)
    try:
        wait_for(lambda: len(registry.read_all(pb.state_path)) == 2, timeout=20, what="two workers registered")
        store = StateStore(pb.state_path, pb.name)
        st = store.load()
        st.phase, st.generation = Phase.MIRRORING, st.generation + 1
        store.save(st)
        assert registry.await_ack(pb.state_path, st.generation, 5).ok

        def samples() -> dict[tuple, float]:
            with urllib.request.urlopen(f"http://{pb.shim.admin}/metrics", timeout=5) as r:
                families = list(text_string_to_metric_families(r.read().decode()))
            assert {f.name for f in families} == single
            return {(s.name, *sorted(s.labels.values())): s.value for f in families for s in f.samples}

        # The workers' statuses reach the supervisor at their next heartbeat.
        wait_for(lambda: samples().get(("migrator_shim_applied_generation", "mirroring")) == st.generation,
                 timeout=5, what="both workers' applied generation")
        got = samples()
        assert got[("migrator_shim_state_generation", "mirroring")] == st.generation
        assert got[("migrator_shim_mirror_queue_limit",)] == 1000
        assert got[("migrator_shim_side_up", "source")] == 1 and got[("migrator_shim_side_up", "target")] == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_real_prometheus_scrapes_the_shim(shim_env, tmp_path):
    """A real Prometheus scraping the shim's /metrics (1s interval) answers a query with the shim's count and raises MigratorSideDown when the target stops."""
    prometheus = _tool("prometheus")
    env = shim_env
    env.flush()
    compared = env.stats().compared
    assert compared >= 10
    port = servers.free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "scrape_configs": [{"job_name": "migrator-shim",
                            "static_configs": [{"targets": [f"127.0.0.1:{env.thread.admin_port}"]}]}],
    }))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(q: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.load(r)
            except OSError:
                assert proc.poll() is None, f"prometheus exited with {proc.returncode}; see {log.name}"
                return []
            assert body["status"] == "success", body
            return body["data"]["result"]

        q = 'migrator_shim_compared_total{job="migrator-shim"}'
        wait_for(lambda: query(q), timeout=30, interval=0.2, what="a scrape of the shim by prometheus")
        [result] = query(q)
        assert float(result["value"][1]) == compared
        assert result["metric"]["instance"] == f"127.0.0.1:{env.thread.admin_port}"
        [up] = query('up{job="migrator-shim"}')
        assert up["value"][1] == "1"
        # Every dashboard query is valid PromQL (Grafana's variables filled in as Grafana does).
        for title, expr in _dashboard_exprs():
            q = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    assert json.load(r)["status"] == "success"
            except urllib.error.HTTPError as e:
                pytest.fail(f"panel {title!r}: prometheus refuses {q!r}: {e.read().decode()}")
        # The shipped rules are loaded and evaluated against the live shim: once it is scraped
        # none is pending or firing (MigratorShimAbsent is pending until the first scrape; a rule
        # not evaluated yet reports the year 0001).
        def rules() -> list[dict]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as r:
                return [rule for g in json.load(r)["data"]["groups"] for rule in g["rules"]]

        assert {r["name"] for r in rules()} >= REQUIRED_ALERTS
        wait_for(lambda: all(r["state"] == "inactive" and r.get("lastEvaluation", "").startswith("2")
                             for r in rules()), timeout=10, what="no alert active on a healthy shim")
        # The target stops: the real shim's series raise MigratorSideDown for it (pending for its 30s).
        for c in env.clients:
            c.close()
        env.target.stop()

        def side_down() -> list[dict]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as r:
                return [a for a in json.load(r)["data"]["alerts"] if a["labels"]["alertname"] == "MigratorSideDown"]

        wait_for(side_down, timeout=15, interval=0.2, what="MigratorSideDown raised by prometheus")
        [alert] = side_down()
        assert alert["labels"]["side"] == "target" and alert["state"] == "pending", alert
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
