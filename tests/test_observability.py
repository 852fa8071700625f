"""What a person watching a run sees: the Grafana dashboard's queries against the series the project exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from simplear.observability.dashboards import DASHBOARD, INSTALLED_NAME, install_dashboard, session_dashboards_dir

RUN = "/runs/dashboard-test"
SELECTOR = re.compile(r"\b(ray_simplear_\w+)\s*(?:\{([^}]*)\})?")
NAME_SET = re.compile(r'\{__name__=~"ray_simplear_\(([^)]*)\)"([^}]*)\}')
LABEL = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"')
BY = re.compile(r"\bby\s*\(([^)]*)\)")


def queries(dashboard: dict) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return out


def wanted(expr: str) -> dict[str, set[str]]:
    """Series an expression reads, with the labels it selects or groups by ('le' is the histogram's own)."""
    grouped = {g.strip() for m in BY.finditer(expr) for g in m.group(1).split(",") if g.strip()} - {"le"}
    found: dict[str, set[str]] = {}
    for m in NAME_SET.finditer(expr):
        for name in m.group(1).split("|"):
            found[f"ray_simplear_{name}"] = set(LABEL.findall(m.group(2)))
    for m in SELECTOR.finditer(NAME_SET.sub("", expr)):
        found.setdefault(m.group(1), set()).update(LABEL.findall(m.group(2) or ""))
    label_values = re.search(r"label_values\([^,]*,\s*(\w+)\)", expr)
    extra = {label_values.group(1)} if label_values else set()
    return {name: labels | grouped | extra for name, labels in found.items()}


def exported(text: str) -> dict[str, set[str]]:
    """Series at the Prometheus endpoint, with the labels they carry."""
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"^(ray_simplear_\w+)\{([^}]*)\}", text, re.M):
        out.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2)))
    return out


def test_every_dashboard_query_reads_a_series_the_stages_export(ray_session, tmp_path):
    """The project's exporters (a data stage's row counts and progress, a training row of the loop and of GRPO,
    the serve replica's figures), called in a Ray worker as the stages call them, read back at the node's
    Prometheus endpoint: each query of the dashboard names a series and labels found there, and each series
    found there has a panel."""
    import ray

    @ray.remote(num_cpus=0)
    def export(out_dir: str) -> None:
        from pathlib import Path

        from simplear.serving.metrics import ServeMetrics
        from simplear.train.metrics import MetricsWriter
        from simplear.workflow.metrics import ProgressLine, count_rows

        count_rows("dash_filter", 10, {"too_small": 2, "download:404": 1}, RUN)
        ProgressLine("dash_filter", 10, 0.0, run=RUN).add(10)
        ProgressLine("dash_download", 4, 0.0, unit="shards", run=RUN).add(4)
        writer = MetricsWriter(Path(out_dir) / "dash_grpo", 0, run=RUN)
        writer.write({"step": 3, "loss": 0.5, "tokens_per_s": 1200.0, "lr": 1e-4, "reward_mean": 0.31, "kl": 0.02})
        writer.close()
        serve = ServeMetrics("dash_app", "replica-1")
        serve.answered(200, 0.3, 2)
        serve.answered(429, 0.01, 0)
        serve.queue_depth.set(1)

    ray.get(export.remote(str(tmp_path)))
    dashboard = json.loads(DASHBOARD.read_text())
    needed: dict[str, set[str]] = {}
    for expr in queries(dashboard):
        for name, labels in wanted(expr).items():
            needed.setdefault(name, set()).update(labels)
    assert len(needed) >= 14, sorted(needed)
    deadline = time.time() + 30
    while True:
        text = ray_session.scrape()
        have = exported(text)
        if set(needed) <= set(have) or time.time() > deadline:
            break
        time.sleep(1)
    assert not set(needed) - set(have), f"the dashboard reads series nothing exports: {sorted(set(needed) - set(have))}"
    for name, labels in needed.items():
        assert labels <= have[name], f"{name}: the dashboard selects labels {sorted(labels - have[name])} it does not carry"
    # the reverse: a series the project exports has a panel (histograms: their _count/_bucket, counters: _total)
    bases = {re.sub(r"_(sum|count|bucket)$", "", n) for n in needed}
    missing = {n for n in have if re.sub(r"_(sum|count|bucket)$", "", n) not in bases}
    assert not missing, f"exported but on no panel: {sorted(missing)}"
    # what the run's figures are: the training row's values, the rejected rows by reason
    assert re.search(r'^ray_simplear_train_reward_mean\{[^}]*stage="dash_grpo"[^}]*\} 0.31$', text, re.M)
    assert re.search(r'^ray_simplear_rows_rejected_total\{[^}]*reason="download:404"[^}]*stage="dash_filter"[^}]*\} 1.0$', text, re.M)


def test_dashboard_is_well_formed_and_installs_where_grafana_looks(tmp_path, monkeypatch):
    """Variables the queries use are defined; panels do not overlap; the session folder is Ray's provisioned one
    (or Ray's override of it); `simplear dashboards install DIR` writes the same file."""
    from simplear.cli import main

    dashboard = json.loads(DASHBOARD.read_text())
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = {m for expr in queries(dashboard) for m in re.findall(r"\$(\w+)", expr)}
    used |= {m for p in dashboard["panels"] for m in re.findall(r"\$\{?(\w+)", json.dumps(p.get("datasource", "")))}
    assert used == {"run", "stage", "app", "datasource"} and used <= defined
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, p["title"]
        cells |= mine
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

    monkeypatch.delenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", raising=False)
    assert session_dashboards_dir("/tmp/ray/session_x") == Path("/tmp/ray/session_x/metrics/grafana/dashboards")
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(tmp_path / "elsewhere"))
    assert session_dashboards_dir("/tmp/ray/session_x") == tmp_path / "elsewhere"
    assert install_dashboard(tmp_path / "a").read_bytes() == DASHBOARD.read_bytes()
    assert main(["dashboards", "install", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / INSTALLED_NAME).read_text()) == dashboard
