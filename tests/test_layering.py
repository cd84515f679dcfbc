"""The detector library stays pure: importing it (and its CLI) never pulls in kfp or mlflow."""

import subprocess
import sys


def test_detector_imports_no_pipeline_or_registry_code():
    code = (
        "import sys, detector, detector.reference, detector.artifact, detector.commands;"
        "bad = [m for m in ('kfp', 'mlflow') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
