"""Compile the pipelines to KFP IR YAML (what a cluster runs)."""

from __future__ import annotations

from pathlib import Path


def compile_all(out_dir: str | Path) -> list[Path]:
    from kfp import compiler

    from pipelines.facenet import PIPELINES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, func in PIPELINES.items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(func, str(path))
        paths.append(path)
    return paths
