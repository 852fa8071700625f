"""The project's Grafana dashboard (grafana/simplear.json), put where a Grafana finds it.

Ray's dashboard writes its own Grafana dashboards and a provisioning file naming their folder when a node with
metrics starts; a Grafana started with Ray's `grafana.ini` loads every JSON in that folder. An embedded run
adds ours there; for a cluster's own Grafana, `simplear dashboards install DIR` copies it to a provisioned
folder (or import the file by hand)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("simplear.observability")

DASHBOARD = Path(__file__).with_name("grafana") / "simplear.json"
INSTALLED_NAME = "simplear_grafana_dashboard.json"  # beside Ray's `<name>_grafana_dashboard.json`
RAY_OUTPUT_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"  # Ray's override of the folder


def install_dashboard(dest: Path) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / INSTALLED_NAME
    shutil.copyfile(DASHBOARD, target)
    return target


def session_dashboards_dir(session_dir: str) -> Path:
    """The folder Ray's provisioning file names for a session: its override when set, else the session's own."""
    return Path(os.environ.get(RAY_OUTPUT_DIR_ENV) or Path(session_dir) / "metrics" / "grafana" / "dashboards")


def install_in_session(session_dir: str) -> Path | None:
    """Best effort: a run goes on without the dashboard when the folder cannot be written."""
    try:
        path = install_dashboard(session_dashboards_dir(session_dir))
    except OSError as e:
        log.warning("Grafana dashboard not installed in the Ray session (%s); `simplear dashboards install DIR` copies it", e)
        return None
    log.info("Grafana dashboard 'SimpleAR stages': %s", path)
    return path
