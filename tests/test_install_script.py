"""The Makefile's pip wrapper (mk/pip-install): retries a failed install, passes pip's exit code through."""

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "mk" / "pip-install"


def _fake_python(tmp_path: Path, failures: int, rc: int = 1) -> Path:
    """A stand-in for `python` whose `-m pip install` fails `failures` times with `rc`, then succeeds.

    Every call is appended to calls.log; `pip install --help` advertises --resume-retries like pip >= 25.1.
    """
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'log="{tmp_path}/calls.log"\n'
        'if [[ " $* " == *" --help "* ]]; then echo "  --resume-retries <n>"; exit 0; fi\n'
        'echo "$*" >> "$log"\n'
        f'if (( $(wc -l < "$log") <= {failures} )); then echo "download cut" >&2; exit {rc}; fi\n'
        "exit 0\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return fake


def _run(fake: Path, attempts: int = 4) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_INSTALL_ATTEMPTS=str(attempts), PIP_INSTALL_PAUSE="0")
    return subprocess.run(
        ["bash", str(SCRIPT), str(fake), "-q", "somepkg==1.0"], env=env, capture_output=True, text=True, timeout=60
    )


def test_pip_install_retries_until_it_succeeds(tmp_path):
    fake = _fake_python(tmp_path, failures=2)
    result = _run(fake)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 3
    # pip's own retry options are passed, and the user's arguments arrive unchanged at the end.
    assert all(c.startswith("-m pip install --retries 10 --timeout 60 --resume-retries 10") for c in calls)
    assert all(c.endswith("-q somepkg==1.0") for c in calls)
    assert result.stderr.count("retrying") == 2


def test_pip_install_gives_up_with_pips_exit_code(tmp_path):
    fake = _fake_python(tmp_path, failures=10, rc=3)
    result = _run(fake, attempts=3)
    assert result.returncode == 3
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 3
    assert "failed 3 times" in result.stderr


def test_pip_install_real_pip_accepts_the_options(tmp_path):
    # The options the wrapper adds must be understood by this environment's pip: `pip` itself is already
    # installed, so the offline dry run succeeds without touching anything.
    result = subprocess.run(
        ["bash", str(SCRIPT), sys.executable, "--dry-run", "--no-deps", "--no-index", "pip"],
        env=dict(os.environ, PIP_INSTALL_ATTEMPTS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
