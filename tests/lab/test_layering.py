"""The layers hold: every import in the source (lazy and dynamic ones included) goes down.

``detector`` (the product's library) → ``components`` → ``pipelines`` → ``lab`` →
``backdoor_gate`` (the CLI root); no module imports a later layer, the library imports no
kfp/mlflow/training stack, and no two modules import each other, however indirectly.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

from lab import imports

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_goes_down_the_layers():
    g = imports.build(ROOT)
    assert {"detector.decision", "components.trainer.train", "lab.paper", "backdoor_gate.cli"} <= g.modules
    assert imports.layer_violations(g) == []
    assert g.unresolved == [], "a dynamic import the layering check cannot read"


def test_no_import_cycles():
    assert imports.cycles(imports.build(ROOT)) == []


def test_the_check_sees_lazy_dynamic_and_cyclic_imports(tmp_path):
    """The checker itself: a library module that imports lab inside a function, a dynamic
    import by name, and a two-module cycle are all reported."""
    (tmp_path / "detector").mkdir()
    (tmp_path / "lab").mkdir()
    for pkg in ("detector", "lab"):
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "detector" / "a.py").write_text(
        textwrap.dedent("""
        import importlib
        def f():
            from lab import paper
            return importlib.import_module("mlflow"), importlib.import_module(name)
        from detector import b
    """)
    )
    (tmp_path / "detector" / "b.py").write_text("import detector.a\n")
    (tmp_path / "lab" / "paper.py").write_text("")
    g = imports.build(tmp_path)
    bad = imports.layer_violations(g)
    assert any("imports lab.paper" in b for b in bad) and any("imports mlflow" in b for b in bad), bad
    assert [m for m, _, _ in g.unresolved] == ["detector.a"]
    assert imports.cycles(g) == [["detector.a", "detector.b"]]


def test_importing_the_library_loads_no_pipeline_registry_or_training_code():
    code = (
        "import sys, detector.detectors, detector.decision, detector.signing;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kfp', 'mlflow', 'components', 'pipelines', 'lab', 'backdoor_gate', 'facenet_pytorch', 'torchvision'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
