"""Shared helpers: atomic directory writes (a finished block replaces the directory, a failed one leaves it as
it was) and keeping freed memory in the process (no page faults every step)."""
import os
import subprocess
import sys

import pytest

from hyperloop_lm.utils import atomic_dir, keep_freed_memory


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


_FAULTS = """
import resource, sys, torch
from hyperloop_lm.utils import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():  # a training step in miniature: large activations allocated, written, freed again
    acts = [torch.empty(8 << 20).fill_(1.0) for _ in range(4)]  # 4 x 32 MiB
    return sum(a[0].item() for a in acts)
def faults():  # minor page faults taken by one step
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(applied, *[faults() for _ in range(8)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_the_per_step_page_faults():
    """Buffers freed and allocated again every step are faulted in afresh by default (glibc unmaps them),
    and, once the heap has grown to the step's peak, not at all after keep_freed_memory()."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = {}
    for mode in ("default", "keep"):
        res = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env, check=True)
        applied, *faults = res.stdout.split()
        out[mode] = (applied == "True", [int(f) for f in faults])
    assert out["keep"][0] and not out["default"][0]
    default, kept = out["default"][1][-2:], out["keep"][1][-2:]  # steady state
    assert min(default) > 10_000  # 128 MiB in 4 KiB pages is 32768 faults
    assert max(kept) < min(default) / 20, out


def test_keep_freed_memory_leaves_a_users_malloc_settings_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False


def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path):
    """Not mkstemp's private 0600: a written checkpoint or report is readable like any other file."""
    from hyperloop_lm.utils import atomic_write_text

    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
    (tmp_path / "plain").mkdir()
    with atomic_dir(tmp_path / "atomic"):
        pass
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode
