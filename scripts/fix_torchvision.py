"""Make PyPI's torchvision (a CUDA build) importable beside CPU torch, then prove it.

Its `_meta_registrations.py` registers fake kernels for compiled ops (`torchvision::nms`, ...)
that the CPU torch does not have, so `import torchvision` fails, and with it open_clip, timm and
the Qwen2-VL processor. The registrations are skipped when `torchvision.extension._has_ops()` is
false; transforms work, compiled ops (nms, decode_jpeg) stay unavailable. Idempotent; a reinstall
of torchvision undoes it, so the install script runs this every time.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARKER = "# simplear: fake kernels only where the compiled ops exist"
GUARD = f"""
{MARKER}
def _register_fake_if_ops(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
"""


def patch() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("torchvision is not installed")
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        return f"already patched: {path}"
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        sys.exit(f"{path}: unexpected layout, cannot patch (anchor {anchor.strip()!r} missing)")
    text = text.replace(anchor, anchor + GUARD, 1).replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
    path.write_text(text)
    return f"patched: {path}"


def check() -> None:
    code = "import torchvision, torchvision.transforms.v2 as T, torch; T.Resize(8)(torch.zeros(3, 16, 16)); print(torchvision.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"torchvision still fails to import:\n{out.stderr[-2000:]}")
    print(f"torchvision {out.stdout.strip()} imports and transforms work")


if __name__ == "__main__":
    print(patch())
    check()
