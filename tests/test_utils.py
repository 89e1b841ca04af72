"""Atomic directory writes: a finished block replaces the directory, a failed one leaves it as it was."""
import pytest

from hyperloop_lm.utils import atomic_dir


def test_atomic_dir_replaces_only_when_the_block_finishes(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing visible until the block finishes
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (out / "a").read_text() == "1"  # the previous directory, untouched
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directories left behind


def test_atomic_dir_keep_existing_drops_the_build(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs").write_text("x")
    with atomic_dir(out, keep_existing=lambda: True) as tmp:
        (tmp / "mine").write_text("y")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    with atomic_dir(out, keep_existing=lambda: False) as tmp:
        (tmp / "mine").write_text("y")
    assert [p.name for p in out.iterdir()] == ["mine"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
