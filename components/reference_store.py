"""The reference store: publish a signed reference artifact, and read back only a trusted one.

The reference holds the clean networks' statistics the gate scores with; whoever could swap it
could pass anything. So it is published signed (``reference fit --sign`` or the reference key)
and loaded, by the gate and the CLI alike, through :func:`load_trusted_reference`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from components import keys
from components.config import GateConfig
from components.registry import REFERENCE_DIR, Registry, VersionInfo
from components.tags import REFERENCE_SHA
from detector.detectors import load_reference
from detector.errors import InvalidReference
from detector.reference import Reference
from detector.signing import REFERENCE_SIG_FILE, VerdictError, sign_reference, verify_reference


def publish_reference(
    registry: Registry, ref_dir: str | Path, config: GateConfig = GateConfig(), signing_key: Any = None
) -> VersionInfo:
    """Register a reference artifact directory and point the ``current`` alias at it.

    The published artifact is signed: by ``signing_key`` (default: the reference key from the
    environment), or already by a trusted key (``reference fit --sign``). Without either it is
    refused unless ``config.require_signed_reference`` is off.
    """
    ref = load_reference(ref_dir)  # refuses a tampered artifact before it can be published
    if not getattr(ref, "trunk_digests_", None):
        raise InvalidReference(
            ref_dir,
            "not published: it records no frozen trunk, so the gate could pass nothing; fit it on whole networks",
        )
    files = {p.relative_to(ref_dir).as_posix(): p for p in sorted(Path(ref_dir).rglob("*")) if p.is_file()}
    signing_key = signing_key or keys.reference_signing_key_from_env()
    tmp = tempfile.TemporaryDirectory(prefix="backdoor-gate-refsig-")
    if signing_key is not None:  # sign a copy of the signature file, never edit the user's directory
        staged = Path(tmp.name) / "ref"
        staged.mkdir()
        for name, src in files.items():  # a composite reference has members/<name>/ subdirectories
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).symlink_to(Path(src).resolve())
        (staged / REFERENCE_SIG_FILE).unlink(missing_ok=True)
        files[REFERENCE_SIG_FILE] = sign_reference(staged, signing_key)
    elif config.require_signed_reference:
        try:
            verify_reference(ref_dir, config.trusted_reference_keys())
        except VerdictError as e:
            tmp.cleanup()
            raise InvalidReference(
                ref_dir, f"not published: {e}; set {keys.REFERENCE_KEY_FILE_ENV} or sign it"
            ) from None
    with tmp:
        info = _register_reference(registry, ref, files, config)
    registry.set_alias(config.reference_model, config.reference_alias, info.version)
    return info


def _register_reference(registry: Registry, ref: Reference, files: dict, config: GateConfig) -> VersionInfo:
    return registry.register(
        config.reference_model,
        files,
        artifact_dir=REFERENCE_DIR,
        experiment=config.reference_experiment,
        run_name="reference",
        params={"layer": ref.config.layer, "n_reference": ref.n_reference_, "threshold_source": ref.threshold_source_},
        tags={REFERENCE_SHA: ref.artifact_sha256_},
    )


def check_reference_dir(root: str | Path, config: GateConfig) -> str | None:
    """The trusted key id that signed the reference directory (None when not required)."""
    if not config.require_signed_reference:
        return None
    try:
        return verify_reference(root, config.trusted_reference_keys())
    except VerdictError as e:
        raise InvalidReference(
            root, f"refused: {e} (signed references only; trusted keys from ${keys.REFERENCE_KEYS_ENV})"
        ) from None


def load_trusted_reference(root: str | Path, config: GateConfig = GateConfig()) -> Reference:
    """A reference directory, loaded only after its signature checks out (when signatures are
    required) and its digests match: the one way the gate and the CLI read a reference."""
    check_reference_dir(root, config)
    return load_reference(root)


def fetch_reference(registry: Registry, config: GateConfig = GateConfig()) -> tuple[Reference, VersionInfo]:
    info = registry.version_by_alias(config.reference_model, config.reference_alias)
    if info is None:
        raise InvalidReference(
            f"{config.reference_model}@{config.reference_alias}", "no such alias; run the reference pipeline first"
        )
    with tempfile.TemporaryDirectory(prefix="backdoor-gate-ref-") as tmp:
        root = registry.download(info.source, tmp)
        try:
            return load_trusted_reference(root, config), info
        except InvalidReference as e:
            raise InvalidReference(f"{config.reference_model} v{info.version}", e.reason) from None
