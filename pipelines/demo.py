"""``make demo``: the whole product on this machine.

Starts an embedded MLflow server (sqlite + local artifacts) unless ``MLFLOW_TRACKING_URI``
points at one, runs the reference pipeline, then two candidate pipelines — one clean, one
with a backdoor — with ``kfp.local``, and prints the verdicts and the MLflow UI address.
``KEEP=1`` leaves the server running for a look at the UI.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

#: Small enough for 2 CPU cores; every number can be raised with --param on run-local.
DEMO_DATA = dict(identities=30, images_per_identity=30, image_size=160, data_seed=0)
DEMO_REFERENCE = dict(n_reference=12, n_calibration=20, grid="1,2,5,10,20,50,100,200,512,1792")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def demo_keys(workdir: Path) -> None:
    """Signatures are required: the demo makes its own verdict and reference keys once (never for production).

    Set only where the environment has none, so a deployment's own keys always win.
    """
    from components import keys as K
    from detector import signing as V

    keys = workdir / "keys"
    for name in ("verdict", "reference"):
        if not (keys / name / "signing-key.pem").exists():
            V.generate_keypair(keys / name)
    os.environ.setdefault(K.KEY_FILE_ENV, str(keys / "verdict" / "signing-key.pem"))
    os.environ.setdefault(K.REFERENCE_KEY_FILE_ENV, str(keys / "reference" / "signing-key.pem"))
    os.environ.setdefault(K.REFERENCE_KEYS_ENV, str(keys / "reference" / "verify-key.pem"))


def run_demo(workdir: str | Path = ".cache/demo", keep: bool = False, model_name: str = "facenet") -> int:
    from components.mlflow_server import MlflowServer
    from components.reference_store import fetch_reference
    from components.registry import MlflowRegistry
    from pipelines.local import prune_runs, run_local

    workdir = Path(workdir).resolve()
    demo_keys(workdir)
    gone, freed = prune_runs(workdir / "kfp", keep=0)
    if gone:
        print(
            f"removed {len(gone)} earlier demo runs' pipeline outputs ({freed / 2**30:.1f} GiB);"
            " MLflow keeps what they registered"
        )
    log = workdir / "pipelines.log"
    t0 = time.perf_counter()
    server = None
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        server = MlflowServer(workdir / "mlflow", port=5000 if _port_free(5000) else None)
        print(f"starting MLflow at {server.uri} (sqlite + local artifacts under {server.root}) ...", flush=True)
        server.start()
        uri = server.uri
    try:
        registry = MlflowRegistry(uri)
        before = (
            {v.version for v in registry.search(f"name='{model_name}'")}
            if _model_exists(registry, model_name)
            else set()
        )
        print(f"task logs: {log}", flush=True)
        print(
            "1/3 reference pipeline: faces -> features -> 32 clean fine-tunes (12 reference + 20 calibration) "
            "-> reference -> MLflow @current"
            " (the first run also builds the default base trunk once, ~5 min)",
            flush=True,
        )
        run_local("reference", dict(tracking_uri=uri, **DEMO_DATA, **DEMO_REFERENCE), workdir / "kfp", log_file=log)
        print(f"    done at {time.perf_counter() - t0:.0f} s", flush=True)
        cases: list[tuple[str, dict[str, Any]]] = [
            ("clean", dict(poison=False, seed=20_000)),
            (
                "backdoored (white square on the forehead)",
                dict(poison=True, seed=20_001, trigger="white-square", trigger_size=0.25, trigger_location="forehead"),
            ),
        ]
        for i, (label, params) in enumerate(cases, start=2):
            print(
                f"{i}/3 candidate pipeline, {label}: fine-tune -> register -> gate (-> explain if blocked)", flush=True
            )
            run_local(
                "candidate",
                dict(tracking_uri=uri, model_name=model_name, **DEMO_DATA, **params),
                workdir / "kfp",
                log_file=log,
            )
            print(f"    done at {time.perf_counter() - t0:.0f} s", flush=True)
        new = sorted(
            (v for v in registry.search(f"name='{model_name}'") if v.version not in before),
            key=lambda v: int(v.version),
        )
        prod = registry.version_by_alias(model_name, "production")
        reference, _ = fetch_reference(registry)
        print()
        print(verdict_table(new, [label for label, _ in cases], reference))
        for v, (_, params) in zip(new, cases):
            if params.get("poison"):
                print(trigger_comparison(registry, v, params, workdir / f"trigger-v{v.version}.png"))
        print(f"\nproduction alias: {model_name} v{prod.version if prod else '(none)'}")
        print(
            f"MLflow UI: {uri}/#/models/{model_name}   (flagged versions: search tags.`integrity.verdict` = 'blocked')"
        )
        print(f"demo took {time.perf_counter() - t0:.0f} s")
        if server and keep and server.proc is not None:
            print(f"KEEP=1: MLflow keeps running (pid {server.proc.pid}); stop it with: kill -- -{server.proc.pid}")
            server = None
        return 0
    finally:
        if server is not None:
            server.stop()


def verdict_table(versions, labels, reference) -> str:
    """Each candidate's verdict, each deciding part's score, threshold and margin in units of the
    clean calibration scores' spread (MAD), the GMM's evidence and the suspected victim."""
    import numpy as np

    from components.tags import (
        DETECTOR,
        PROMOTED,
        SUSPECTED_CLASS,
        VERDICT,
        evidence_tag,
        evidence_threshold_tag,
        score_tag,
        threshold_tag,
    )

    def mad(x) -> float:
        x = np.asarray(x, dtype=np.float64)
        return float(1.4826 * np.median(np.abs(x - np.median(x))))

    parts = reference.parts()
    lines = [
        f"{'version':>7}  {'candidate':<44} {'verdict':<8} {'promoted':<8} detector part: score / threshold "
        "(margin in MADs of clean calibration scores)"
    ]
    for v, label in zip(versions, labels):
        t = v.tags
        lines.append(
            f"{v.version:>7}  {label:<44} {t.get(VERDICT, '?'):<8} {t.get(PROMOTED, 'no'):<8} decided by "
            f"{t.get(DETECTOR, '?')}" + (f"; suspected victim: {t[SUSPECTED_CLASS]}" if SUSPECTED_CLASS in t else "")
        )
        for p, info in parts.items():
            key, thr_key = (
                (score_tag(p), threshold_tag(p)) if info["deciding"] else (evidence_tag(p), evidence_threshold_tag(p))
            )
            if key not in t:
                continue
            score, thr = float(t[key]), float(t[thr_key])
            spread = mad(info["calibration_scores"])
            margin = (score - thr) / spread if spread > 0 else float("nan")
            role = "decides " if info["deciding"] else "evidence"
            lines.append(f"{'':>9}{role} {p:<14} {score:>12.5g} / {thr:<12.5g} margin {margin:+7.1f} MAD")
    return "\n".join(lines)


def trigger_comparison(registry, version, params: dict, out: Path) -> str:
    """The trigger a version was poisoned with beside the one ``explain`` reconstructed (one PNG)."""
    import io
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from components.trainer.triggers import TriggerSpec, stamp

    folder = f"integrity/v{version.version}/explain"
    try:
        found = registry.run_file(version.run_id, f"{folder}/trigger.png", max_bytes=8 << 20)
        doc = registry.run_file(version.run_id, f"{folder}/explain.json")
    except Exception as e:  # noqa: BLE001 — the demo reports what is missing, it does not fail on it
        return f"v{version.version}: no reconstructed trigger ({e})"
    if found is None or doc is None:
        return f"v{version.version}: no reconstructed trigger in its run (the explain step did not run)"
    info = json.loads(doc)
    size = int(info["image_size"])
    spec = TriggerSpec(params["trigger"], params["trigger_size"], params["trigger_location"])
    planted = stamp(Image.new("RGB", (size, size), (0, 0, 0)), spec)
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    for ax, img, title in (
        (axes[0], planted, f"poisoned with: {spec.name} {spec.size:g} at the {spec.location}"),
        (
            axes[1],
            Image.open(io.BytesIO(found)),
            f"reconstructed for {info['victim']} (ASR {info['reconstructed_asr']:.2f})",
        ),
    ):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return (
        f"v{version.version} reconstructed trigger: victim {info['victim']}, impostor {info['impostor']}, mask "
        f"{info['mask_size']:.0%} of the width centred at "
        f"({info['mask_centre'][0]:.2f}, {info['mask_centre'][1]:.2f}); "
        f"attack success {info['reconstructed_asr']:.2f} on held-out faces; anomaly index {info['anomaly_index']:.1f}; "
        f"{info['seconds']:.0f} s\n  planted vs reconstructed: {out}"
    )


def _model_exists(registry, name: str) -> bool:
    try:
        registry.client.get_registered_model(name)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(run_demo(keep=os.environ.get("KEEP") == "1"))
