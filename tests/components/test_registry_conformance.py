"""One behaviour, two backends: the in-memory registry against a real `mlflow server`.

Every test runs on both, so the fast promotion tests (tests/components/test_promotion.py), which
use the in-memory backend, rest on registry semantics a real server has: string version
numbers, an alias on one version at a time, tag rules, search filters, artifact downloads.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from components.registry import MlflowRegistry, Registry, RegistryError
from components.registry_memory import InMemoryRegistry


@pytest.fixture(params=["memory", "mlflow"])
def registry(request) -> Registry:
    if request.param == "memory":
        return InMemoryRegistry()
    return MlflowRegistry(request.getfixturevalue("mlflow_server").uri)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    (tmp_path / "model.safetensors").write_bytes(b"weights " * 100)
    (tmp_path / "notes.txt").write_text("hello")
    return {"model.safetensors": tmp_path / "model.safetensors", "sub/notes.txt": tmp_path / "notes.txt"}


def _name() -> str:
    return f"conformance-{uuid.uuid4().hex[:12]}"


def test_versions_are_numbered_per_model_as_strings(registry, files):
    a, b = _name(), _name()
    v1 = registry.register(a, files, tags={"registered_by": "ci", "n": 3})
    v2 = registry.register(a, files)
    w1 = registry.register(b, files)
    assert (v1.version, v2.version, w1.version) == ("1", "2", "1")
    assert (v1.name, v1.aliases, v1.user_id) == (a, (), None)
    assert v1.tags == {"registered_by": "ci", "n": "3"} and v2.tags == {}
    assert v1.run_id and v1.run_id != v2.run_id and v1.source.startswith(f"runs:/{v1.run_id}/")
    assert registry.version(a, 2) == registry.version(a, "2") == v2
    assert [v.version for v in registry.versions(a)] == ["2", "1"]
    assert registry.versions(_name()) == []


def test_missing_versions_are_errors_and_missing_aliases_are_none(registry, files):
    name = _name()
    with pytest.raises(RegistryError):
        registry.version(name, "1")
    registry.register(name, files)
    for bad in ("2", "x"):
        with pytest.raises(RegistryError):
            registry.version(name, bad)
    assert registry.version_by_alias(name, "production") is None
    assert registry.version_by_alias(_name(), "production") is None


def test_an_alias_is_on_one_version_at_a_time(registry, files):
    name = _name()
    v1, v2 = registry.register(name, files), registry.register(name, files)
    registry.set_alias(name, "production", v1.version)
    registry.set_alias(name, "canary", v1.version)
    assert registry.version(name, "1").aliases == ("canary", "production")
    registry.set_alias(name, "production", v2.version)  # moves, never copies
    assert registry.version_by_alias(name, "production").version == "2"
    assert (registry.version(name, "1").aliases, registry.version(name, "2").aliases) == (("canary",), ("production",))
    registry.delete_alias(name, "production")
    registry.delete_alias(name, "production")  # again: nothing to delete, no error
    assert registry.version_by_alias(name, "production") is None
    assert registry.version(name, "2").aliases == ()


def test_alias_writes_that_mlflow_refuses(registry, files):
    name = _name()
    registry.register(name, files)
    for alias, version in (("production", "7"), ("latest", "1"), ("v1", "1"), ("bad alias", "1")):
        with pytest.raises(RegistryError):
            registry.set_alias(name, alias, version)
    with pytest.raises(RegistryError):
        registry.delete_alias(_name(), "production")  # no such model
    assert registry.version(name, "1").aliases == ()


def test_tags_are_strings_set_one_by_one_and_validated(registry, files):
    name = _name()
    v = registry.register(name, files)
    registry.set_tags(name, v.version, {"integrity.verdict": "pending", "integrity.score.forward": 0.5, "flag": True})
    registry.set_tags(name, v.version, {"integrity.verdict": "passed"})
    assert registry.version(name, v.version).tags == {
        "integrity.verdict": "passed",
        "integrity.score.forward": "0.5",
        "flag": "True",
    }
    with pytest.raises(RegistryError):
        registry.set_tags(name, v.version, {"ok": "1", "integrity.reason": "x" * 100_001})
    with pytest.raises(RegistryError):
        registry.set_tags(name, v.version, {"bad key!": "1"})
    with pytest.raises(RegistryError):
        registry.set_tags(name, "9", {"ok": "1"})
    assert registry.version(name, v.version).tags["ok"] == "1"  # written before the refused one


def test_search_by_name_and_tag(registry, files):
    name, other = _name(), _name()
    vs = [registry.register(name, files) for _ in range(3)]
    registry.register(other, files, tags={"integrity.verdict": "blocked"})
    registry.set_tags(name, vs[1].version, {"integrity.verdict": "blocked"})
    registry.set_tags(name, vs[2].version, {"integrity.verdict": "passed"})
    assert sorted(v.version for v in registry.search(f"name='{name}'")) == ["1", "2", "3"]
    flagged = registry.search(f"name='{name}' and tags.`integrity.verdict`='blocked'")
    assert [(v.name, v.version) for v in flagged] == [(name, "2")]
    assert flagged[0] == registry.version(name, "2")
    assert registry.search(f"name='{_name()}'") == []


def test_downloads_name_what_they_fetched(registry, files, tmp_path):
    name = _name()
    v = registry.register(name, files, artifact_dir="weights")
    registry.set_alias(name, "production", v.version)
    for i, uri in enumerate((v.source, f"models:/{name}/{v.version}", f"models:/{name}@production")):
        got = registry.download(uri, tmp_path / f"d{i}")
        assert got.name == "weights" and got.is_dir(), (uri, got)
        assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
            "model.safetensors",
            "sub/notes.txt",
        ]
    one = registry.download(f"models:/{name}@production/model.safetensors", tmp_path / "one")
    assert one.is_file() and one.name == "model.safetensors" and one.read_bytes() == b"weights " * 100
    with pytest.raises(RegistryError):
        registry.download(f"models:/{name}@nowhere", tmp_path / "none")


def test_the_artifact_tree_is_read_whole_and_bounded(registry, files):
    v = registry.register(_name(), files)
    art = registry.download_artifact(v, max_bytes=10_000)
    assert art.files == {"model.safetensors": b"weights " * 100, "sub/notes.txt": b"hello"}
    with pytest.raises(ValueError, match="over the 100-byte limit"):
        registry.download_artifact(v, max_bytes=100)


def test_run_files_logged_after_registration(registry, files, tmp_path):
    name = _name()
    v = registry.register(name, files)
    out = tmp_path / "integrity"
    (out / "deep").mkdir(parents=True)
    (out / "verdict.json").write_text('{"verdict": "passed"}')
    (out / "deep" / "report.html").write_text("<p>report</p>")
    uri = registry.log_artifacts_to_run(v.run_id, out, f"integrity/v{v.version}")
    assert uri.endswith(f"/integrity/v{v.version}")
    assert registry.run_file(v.run_id, f"integrity/v{v.version}/verdict.json") == b'{"verdict": "passed"}'
    assert registry.run_file(v.run_id, f"integrity/v{v.version}/deep/report.html") == b"<p>report</p>"
    assert registry.run_file(v.run_id, f"integrity/v{v.version}/override.json") is None
    assert registry.run_file(v.run_id, f"integrity/v{v.version}/deep") is None  # a folder, not a file
    assert registry.run_file(None, "integrity/v1/verdict.json") is None
    with pytest.raises(RegistryError):
        registry.run_file(v.run_id, f"integrity/v{v.version}/verdict.json", max_bytes=5)
    got = registry.download(uri, tmp_path / "back")
    assert got.name == f"v{v.version}" and (got / "deep" / "report.html").read_text() == "<p>report</p>"
    report = registry.download(f"{uri}/deep/report.html", tmp_path / "page")
    assert report.name == "report.html" and report.read_text() == "<p>report</p>"
    # the version's own artifact tree is unchanged by what the gate logs beside it
    assert set(registry.download_artifact(v, 10_000).files) == {"model.safetensors", "sub/notes.txt"}
