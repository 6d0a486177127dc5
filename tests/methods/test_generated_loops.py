"""The generated one-pass loops' files: where they go, when they are written again, what they hold."""

import ast

import pytest

from mergesmith.methods import _generated_loops


def test_a_module_file_is_written_once_and_named_by_its_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_LOOP_DIR", str(tmp_path / "loops"))
    source = _generated_loops.merge_loop_source(4)
    first = _generated_loops._module_file("merge", 4, source)
    assert first.parent == tmp_path / "loops" and first.name.startswith("merge_loop_4_")
    assert first.read_text() == source
    stamp = first.stat().st_mtime_ns
    again = _generated_loops._module_file("merge", 4, source)
    assert again == first and again.stat().st_mtime_ns == stamp  # not rewritten: numba's cache of it stays valid
    assert [p.name for p in (tmp_path / "loops").iterdir()] == [first.name]  # no temporary file left


def test_a_changed_source_gets_a_new_file_and_the_old_one_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_LOOP_DIR", str(tmp_path))
    old = _generated_loops._module_file("merge", 5, _generated_loops.merge_loop_source(5))
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / f"{old.stem}.merge_into-50.py311.nbi").write_text("stale")
    other_count = _generated_loops._module_file("merge", 6, _generated_loops.merge_loop_source(6))
    other_kind = _generated_loops._module_file("variance", 5, _generated_loops.variance_loop_source(5))
    new = _generated_loops._module_file("merge", 5, _generated_loops.merge_loop_source(5) + "# changed\n")
    assert new != old and new.exists() and not old.exists()
    assert not list(cache.iterdir())  # numba's cache files of the old digest removed with it
    assert other_count.exists() and other_kind.exists()  # another count's or kind's module is left alone


@pytest.mark.parametrize("count", [3, 7, 12])
def test_the_source_names_every_model_and_adds_them_in_order(count):
    source = _generated_loops.merge_loop_source(count)
    ast.parse(source)
    assert f"model{count - 1}" in source and f"model{count}" not in source
    chain = "((d0 + d1) + d2)"
    assert chain in source  # float32 sums in model order, as the rows add them


@pytest.mark.parametrize("count", [2, _generated_loops.MAX_MODELS + 1])
def test_counts_outside_the_generated_range_are_refused(count):
    with pytest.raises(ValueError, match="one-pass loops take 3 to"):
        _generated_loops.merge_loop(count)


def test_the_loop_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGESMITH_LOOP_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _generated_loops.loop_dir() == tmp_path / "mergesmith" / "loops"
    monkeypatch.setenv("MERGESMITH_LOOP_DIR", str(tmp_path / "here"))
    assert _generated_loops.loop_dir() == tmp_path / "here"


def test_the_variance_divides_by_powers_of_two_as_multiplications():
    # `welford_variance_into`'s operations: 1 / count is exact for a power of two, so both give the same bits,
    # and the multiplication is the faster
    source = _generated_loops.variance_loop_source(5)
    ast.parse(source)
    assert "mean += step * (1.0 / 2.0)" in source and "mean += step / 3.0" in source
    assert "mean += step * (1.0 / 4.0)" in source and "out[i] = np.float32(m2 / 5.0)" in source
    assert "np.float32(m2 * (1.0 / 4.0))" in _generated_loops.variance_loop_source(4)
