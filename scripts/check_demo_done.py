"""CI's guard on the main job: after `simplear run workflow.yaml`, every stage is done, the run's report.html has a
section for each with its images inlined, and a second run skips them all without starting Ray. Exits non-zero,
saying what is wrong, otherwise."""

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

WORKFLOW = sys.argv[1] if len(sys.argv) > 1 else "workflow.yaml"
cli = [sys.executable, "-m", "simplear"]

status = json.loads(subprocess.run(cli + ["status", WORKFLOW, "--json"], capture_output=True, text=True, check=True).stdout)
stages = status["stages"]
not_done = {n: s["state"] for n, s in stages.items() if s["state"] != "done"}
if not_done:
    sys.exit(f"not done after the demo: {not_done}")
report = Path(status["run_dir"]) / "report.html"
if not report.exists():
    sys.exit(f"the demo wrote no {report}")
page = report.read_text()
missing = [n for n in stages if f"id='stage-{n}'" not in page]
images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
for data in images:
    Image.open(io.BytesIO(base64.b64decode(data))).verify()
if missing or len(images) < 5:
    sys.exit(f"{report}: no section for {missing}, {len(images)} inlined images")
rerun = subprocess.run(cli + ["run", WORKFLOW], capture_output=True, text=True)
log = rerun.stdout + rerun.stderr
skipped = [n for n in stages if f"{n}: up to date, skipped" in log]
if rerun.returncode != 0 or skipped != list(stages) or "starting an embedded Ray" in log:
    sys.exit(f"the rerun did work (rc {rerun.returncode}, skipped {skipped} of {list(stages)}):\n{log[-3000:]}")
print(f"demo: all {len(stages)} stages done, {report} shows them ({len(images)} images); "
      "a rerun skipped them all without starting Ray")
