"""``explain`` for a registered version: the victim from the gate's tag (the impostor from the
reference it judged by), the images and the JSON logged to the version's run and its report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from components.explain import ExplainError, explain, write_outputs
from components.trigger_search import ExplainConfig

#: where a version's explanation goes in its run (beside the gate's report)
EXPLAIN_DIR = "explain"


def suspects_from_file(path: str | Path) -> tuple[str | None, str | None]:
    """(victim, impostor) from a verdict document (signed envelope or not) or a ``score --json`` line."""
    try:
        text = Path(path).read_text()
        obj = json.loads(text.strip().splitlines()[-1] if text.strip() else "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, IndexError) as e:
        raise ExplainError(f"--verdict {path}: not a verdict document or a score --json line ({e})") from None
    if not isinstance(obj, dict):
        raise ExplainError(f"--verdict {path}: not a JSON object")
    doc = obj.get("document", obj) if isinstance(obj.get("document"), dict) else obj
    victim = doc.get("suspected_class")
    if victim is None:
        raise ExplainError(
            f"--verdict {path}: names no suspected victim (only a blocked verdict does); give --victim NAME"
        )
    return str(victim), doc.get("suspected_impostor")


def explain_version(
    model: str,
    version: str,
    registry,
    faces_dir: str | Path,
    out_dir: str | Path,
    *,
    victim: str | None = None,
    impostor: str | None = None,
    config: ExplainConfig = ExplainConfig(),
    progress: bool = False,
    log_to_run: bool = True,
    gate_config=None,
) -> dict[str, Any]:
    """Explain a registered version: its weights, the victim the gate tagged (and the impostor the
    current reference names), images and JSON logged to the version's run and into its report."""

    from components.config import GateConfig
    from components.reference_store import fetch_reference
    from components.registry import weight_file_in
    from components.tags import EXPLAIN_ANOMALY, EXPLAIN_ASR, EXPLAIN_TRIGGER, REPORT, SUSPECTED_CLASS

    info = registry.version(model, version)
    victim = victim or info.tags.get(SUSPECTED_CLASS)
    if not victim:
        raise ExplainError(
            f"{model} v{version} has no {SUSPECTED_CLASS} tag (the gate names one only for a blocked version); "
            "give --victim NAME"
        )
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-explain-") as tmp:
        ckpt = weight_file_in(registry.download(info.source, tmp))
        if impostor is None:
            try:  # the gate records the victim only; the reference it judged by names the impostor
                reference, _ = fetch_reference(registry, gate_config or GateConfig())
                suspect = reference.assess(str(ckpt)).evidence.suspect
                if suspect is not None and suspect.suspected_class == victim:
                    impostor = suspect.suspected_impostor
            except Exception:  # noqa: BLE001 — the impostor is a help, not a need: search all faces
                impostor = None
        result, extra = explain(ckpt, faces_dir, victim, impostor, config, progress)
    paths = write_outputs(result, extra, out_dir)
    out = result.to_dict()
    if log_to_run and info.run_id:
        from components.report import add_trigger

        folder = f"integrity/v{info.version}"
        uri = registry.log_artifacts_to_run(info.run_id, out_dir, f"{folder}/{EXPLAIN_DIR}")
        tags = {
            EXPLAIN_TRIGGER: f"{uri}/trigger.png",
            EXPLAIN_ANOMALY: out["anomaly_index"],
            EXPLAIN_ASR: out["reconstructed_asr"],
        }
        report = registry.run_file(info.run_id, f"{folder}/report.html", max_bytes=16 << 20)
        if report is not None and str(info.tags.get(REPORT, "")).endswith("/report.html"):
            with tempfile.TemporaryDirectory(prefix="backdoor-gate-report-") as tmp:
                (Path(tmp) / "report.html").write_text(add_trigger(report.decode(), paths, out))
                registry.log_artifacts_to_run(info.run_id, tmp, folder)
        registry.set_tags(info.name, info.version, tags)
        out["logged_to"] = uri
    return out
