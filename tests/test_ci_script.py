""".ci/run never passes without the browser test: it stops when Chromium cannot be installed, and it runs pytest
with CI=1, under which tests/test_web.py fails instead of skipping when no browser is found.

The script runs for real, in a copy of the repository layout, with stand-ins for the programs it calls (python3,
pip, apt-get, ruff, pytest) on a PATH that holds nothing else: no network, no install, a fraction of a second."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_ci(tmp_path: Path, apt_works: bool) -> tuple[subprocess.CompletedProcess, Path]:
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    bin_dir.mkdir()
    for tool in ("dirname", "id", "mkdir", "touch", "chmod"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    log = tmp_path / "calls.log"
    _stub(bin_dir, "python3", "mkdir -p .venv/bin && touch .venv/bin/activate")
    for tool in ("python", "pip", "ruff"):
        _stub(bin_dir, tool, f'echo "{tool} $*" >> {log}')
    _stub(bin_dir, "sudo", '"$@"')
    # apt-get either fails (no network, no package) or "installs" a chromium onto the PATH
    install = f'printf "#!/bin/bash\\n" > {bin_dir}/chromium; chmod +x {bin_dir}/chromium'
    _stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}; ' + (install if apt_works else "exit 100"))
    _stub(bin_dir, "pytest", f'echo "pytest $* CI=$CI" >> {log}')
    proc = subprocess.run(
        ["/bin/bash", str(repo / ".ci" / "run")],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        timeout=60,
    )
    return proc, log


def test_ci_stops_when_chromium_cannot_be_installed(tmp_path):
    proc, log = _run_ci(tmp_path, apt_works=False)
    assert proc.returncode != 0
    assert "could not install chromium" in proc.stderr
    calls = log.read_text()
    assert "apt-get" in calls and "pytest" not in calls  # stopped before the tests, not after a skip


def test_ci_runs_pytest_with_ci_set_once_chromium_is_there(tmp_path):
    proc, log = _run_ci(tmp_path, apt_works=True)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines()[-1] == "pytest -q CI=1"


def test_web_test_fails_under_ci_without_a_browser(tmp_path, monkeypatch):
    """tests/test_web.py with no Chromium: failed under CI=1 (a real pytest run of it), skipped otherwise."""
    import pytest
    from test_web import missing

    env = {**os.environ, "FSLM_CHROMIUM": str(tmp_path / "no-chromium"), "PYTHONPATH": str(ROOT), "CI": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_web.py")]
    cmd += ["--basetemp", str(tmp_path / "pytest")]
    ci = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ci.returncode == 1 and "CI is set but no Chromium" in ci.stdout, ci.stdout[-2000:]
    assert "skipped" not in ci.stdout.splitlines()[-1]
    for value in ("", "0", "false"):  # a developer's machine: a skip, with the reason
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="no browser"):
            missing("no browser")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but no browser"):
        missing("no browser")
