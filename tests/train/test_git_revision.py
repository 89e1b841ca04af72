"""A run's recorded git revision is marked dirty by uncommitted edits to the package's code only."""
import shutil
import subprocess

import pytest

from hyperloop_lm.train import trainer


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_revision_dirty_only_for_package_edits(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    pkg = repo / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "code.py").write_text("x = 1\n")
    (repo / "report.md").write_text("v1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (pkg / "train").mkdir()  # the real layout: hyperloop_lm/train/trainer.py, the code it guards one level up
    monkeypatch.setattr(trainer, "__file__", str(pkg / "train" / "trainer.py"))
    clean = trainer.git_revision()
    assert clean != "unknown" and not clean.endswith("+dirty")
    (repo / "report.md").write_text("v2\n")  # a re-rendered report: not the code
    assert trainer.git_revision() == clean
    (pkg / "code.py").write_text("x = 2\n")
    assert trainer.git_revision() == clean + "+dirty"
