"""The CLI: accounting output and one-line errors for expected mistakes."""
import subprocess
import sys

import pytest

from hyperloop_lm.cli import main, parse_overrides
from hyperloop_lm.utils import UserError


def test_info_prints_the_accounting_table(capsys):
    assert main(["info", "--preset", "240m-hyperloop"]) == 0
    out = capsys.readouterr().out
    assert "135.70M" in out and "150.57K" in out and "2-4x3-2" in out


@pytest.mark.parametrize("argv,message", [
    (["info", "--preset", "240m-hyperlop"], "did you mean '240m-hyperloop'"),
    (["info", "--preset", "tiny-hyperloop", "--n_streamz", "3"], "did you mean 'n_streams'"),
    (["info", "--preset", "tiny-hyperloop", "--n_heads", "7"], "ModelConfig.n_heads"),
])
def test_bad_config_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "hyperloop_lm.cli", "info", "--preset", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown preset" in proc.stderr


def test_parse_overrides():
    assert parse_overrides(["--lr", "1e-3", "--model.n_streams=8", "--compile", "true"]) == {
        "lr": 1e-3, "model.n_streams": 8, "compile": True}
    with pytest.raises(UserError):
        parse_overrides(["--lr"])
