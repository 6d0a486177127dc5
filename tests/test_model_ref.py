"""Model references resolve offline: local folders, the Hugging Face cache, revisions; LoRA is parsed."""

from __future__ import annotations

import pytest

from mergesmith.errors import InputError, NotYetSupportedError
from mergesmith.io.model_ref import ModelReference, resolve_model_folder


def test_parse_forms():
    assert ModelReference.parse("org/name") == ModelReference("org/name")
    assert ModelReference.parse("org/name@v1.0") == ModelReference("org/name", "v1.0")
    ref = ModelReference.parse("org/base@abc+org/adapter@def")
    assert (ref.path, ref.revision, ref.lora, ref.lora_revision) == ("org/base", "abc", "org/adapter", "def")
    assert str(ref) == "org/base@abc+org/adapter@def"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "dev").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo


def test_hub_id_resolves_from_cache_by_branch_or_commit(hub_cache):
    assert resolve_model_folder(ModelReference.parse("org/tiny")) == hub_cache / "snapshots" / ("a" * 40)
    assert resolve_model_folder(ModelReference.parse("org/tiny@dev")) == hub_cache / "snapshots" / ("b" * 40)
    assert resolve_model_folder(ModelReference.parse(f"org/tiny@{'b' * 40}")) == hub_cache / "snapshots" / ("b" * 40)


def test_missing_revision_and_missing_model_are_clear(hub_cache):
    with pytest.raises(InputError, match="revision 'v9' is not in the Hugging Face cache"):
        resolve_model_folder(ModelReference.parse("org/tiny@v9"))
    with pytest.raises(InputError, match="org/absent.*never downloads"):
        resolve_model_folder(ModelReference.parse("org/absent"))


def test_local_folder_wins_and_lora_is_not_yet_supported(tmp_path):
    (tmp_path / "m").mkdir()
    assert resolve_model_folder(ModelReference.parse(str(tmp_path / "m"))) == tmp_path / "m"
    with pytest.raises(NotYetSupportedError, match="LoRA"):
        resolve_model_folder(ModelReference.parse(f"{tmp_path / 'm'}+adapter"))
