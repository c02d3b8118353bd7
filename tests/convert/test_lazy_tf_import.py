from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_conversion_and_runtime_modules_does_not_load_tensorflow() -> None:
    code = (
        "import sys\n"
        "import server.convert.keras_loader, server.convert.keras_to_plan, server.convert.reference\n"
        "import server.runtime.tf_runtime, server.training, server.datasets\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
