"""ruff's rules chosen in pyproject.toml hold for the whole repository (part of the test command,
so `.ci/run` fails on a lint error)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([
        sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)
    ], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
