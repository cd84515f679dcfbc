"""The gate records what :mod:`detector.decision` says and decides nothing itself."""

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from components.config import GateConfig
from components.gate import GateResult, gate
from components.registry_memory import InMemoryRegistry
from components.tags import VERDICT
from detector.decision import ERROR, EXIT_CODES, VERDICTS, Decision, fault
from detector.errors import DetectorError

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("detector", "components", "pipelines", "backdoor_gate")


def _verdict_writes(path: Path, root: Path = ROOT) -> list[str]:
    """Places in one module that make a Decision or assign a ``verdict`` attribute, other than
    ``GateResult.record`` in the gate (which copies a Decision it is given)."""
    tree = ast.parse(path.read_text())
    allowed = {
        id(n)
        for fn in ast.walk(tree)
        if path.name == "gate.py" and isinstance(fn, ast.FunctionDef) and fn.name == "record"
        for n in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Decision":
            found.append((node.lineno, "makes a Decision"))
        if isinstance(node, ast.Assign):
            elts = [el for t in node.targets for el in getattr(t, "elts", [t])]
            if any(isinstance(el, ast.Attribute) and el.attr == "verdict" for el in elts):
                found.append((node.lineno, "assigns .verdict"))
    return [f"{path.relative_to(root)}:{line} {what}" for line, what in sorted(found)]


def test_only_the_decision_module_writes_a_verdict():
    bad = [
        w
        for pkg in PRODUCT
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if p != ROOT / "detector" / "decision.py"
        for w in _verdict_writes(p)
    ]
    assert bad == []


def test_the_check_sees_a_verdict_written_outside_the_decision(tmp_path):
    """The checker itself, on code shaped like the gate's old fault handlers."""
    src = tmp_path / "gate.py"
    src.write_text(
        "def f(result, e):\n"
        "    judgement = Judgement(Decision(INVALID, str(e)))\n"
        "    result.error, result.verdict = True, ERROR\n"
        "def record(self, d):\n"
        "    self.verdict = d.verdict\n"
    )
    assert _verdict_writes(src, tmp_path) == ["gate.py:2 makes a Decision", "gate.py:3 assigns .verdict"]


@pytest.mark.parametrize("verdict", VERDICTS)
def test_error_exactly_when_the_gate_failed(verdict):
    """``error``, the exit code and the verdict cannot disagree: they are one field."""
    r = GateResult("m", "1")
    r.record(Decision(verdict, "why"))
    assert (r.error, r.exit_code) == (verdict == ERROR, EXIT_CODES[verdict])
    assert r.to_dict()["error"] == (verdict == ERROR) and r.to_dict()["verdict"] == verdict


def test_a_result_that_never_heard_the_decision_is_an_error():
    r = GateResult("m", "1")
    assert (r.verdict, r.error, r.exit_code) == (ERROR, True, 2)


def test_a_gate_fault_says_so_once(tmp_path):
    """A fault found inside ``judge`` reaches the version's tags as judge said it, once."""
    assert fault("registry down") == Decision(ERROR, "gate error: registry down")

    class Unreadable:  # a reference that cannot score anything: the gate's fault, not the candidate's
        artifact_sha256_, thresholds_, detector = "0" * 64, {"v": 0.0}, "gmm"

        def assess(self, network):
            raise DetectorError("reference arrays unreadable")

    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    registry = InMemoryRegistry()
    v = registry.register("m", {"model.safetensors": tmp_path / "model.safetensors"})
    r = gate("m", v.version, registry=registry, reference=Unreadable(), config=GateConfig(require_signature=False))
    assert r.reason == "gate error: reference arrays unreadable" and r.verdict == ERROR
    assert registry.version("m", v.version).tags[VERDICT] == ERROR
