from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_importing_conversion_and_runtime_modules_does_not_load_tensorflow() -> None:
    code = (
        "import sys\n"
        "import leanserve.server.ingest.keras_loader, leanserve.server.ingest.keras_to_plan, leanserve.server.ingest.reference\n"
        "import leanserve.server.runtime.tf_runtime, leanserve.server.tools.training, leanserve.server.tools.datasets\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
