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


def _run_ci(
    tmp_path: Path, apt_works: bool, tcmalloc: str = "found", apt_tcmalloc_works: bool = True
) -> tuple[subprocess.CompletedProcess, Path]:
    """.ci/run with stand-ins. `tcmalloc`: what the script's `python -c` check of the library finds: "found",
    "missing", or "real" (the check runs in this interpreter, on this machine's libraries)."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    bin_dir.mkdir()
    for tool in ("dirname", "id", "mkdir", "touch", "chmod"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    log = tmp_path / "calls.log"
    _stub(bin_dir, "python3", "mkdir -p .venv/bin && touch .venv/bin/activate")
    for tool in ("pip", "ruff"):
        _stub(bin_dir, tool, f'echo "{tool} $*" >> {log}')
    check = {"found": "exit 0", "missing": "exit 1", "real": f'exec {sys.executable} "$@"'}[tcmalloc]
    _stub(bin_dir, "python", f'echo "python $*" >> {log}; if [ "$1" = -c ]; then {check}; fi')
    _stub(bin_dir, "sudo", '"$@"')
    # apt-get either fails (no network, no package) or "installs" a chromium onto the PATH
    install = f'printf "#!/bin/bash\\n" > {bin_dir}/chromium; chmod +x {bin_dir}/chromium'
    tcmalloc_install = "exit 0" if apt_tcmalloc_works else "exit 100"
    body = f'echo "apt-get $*" >> {log}; ' + (
        f'case "$*" in *libtcmalloc*) {tcmalloc_install};; *chromium*) {install};; esac' if apt_works else "exit 100"
    )
    _stub(bin_dir, "apt-get", body)
    _stub(bin_dir, "pytest", f'echo "pytest $* CI=$CI" >> {log}')
    proc = subprocess.run(
        ["/bin/bash", str(repo / ".ci" / "run")],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        timeout=60,
    )
    return proc, log


TCMALLOC_INSTALL = "apt-get install -y -qq libtcmalloc-minimal4"


def test_ci_stops_when_chromium_cannot_be_installed(tmp_path):
    proc, log = _run_ci(tmp_path, apt_works=False)
    assert proc.returncode != 0
    assert "could not install chromium" in proc.stderr
    calls = log.read_text()
    assert "apt-get" in calls and "pytest" not in calls  # stopped before the tests, not after a skip


def test_ci_runs_pytest_with_ci_set_once_chromium_is_there(tmp_path):
    proc, log = _run_ci(tmp_path, apt_works=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[-1] == "pytest -q CI=1"
    assert TCMALLOC_INSTALL not in calls  # tcmalloc found: nothing to install


def test_ci_installs_tcmalloc_when_it_is_missing(tmp_path):
    """The tcmalloc branch of .ci/run: the library missing, apt-get installs it, then the tests run."""
    proc, log = _run_ci(tmp_path, apt_works=True, tcmalloc="missing")
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    check = next(i for i, c in enumerate(calls) if c.startswith("python -c") and "tcmalloc_minimal" in c)
    assert calls.index(TCMALLOC_INSTALL) > check and calls[-1] == "pytest -q CI=1"


def test_ci_stops_when_tcmalloc_cannot_be_installed(tmp_path):
    proc, log = _run_ci(tmp_path, apt_works=True, tcmalloc="missing", apt_tcmalloc_works=False)
    assert proc.returncode != 0
    assert "could not install libtcmalloc-minimal4" in proc.stderr
    calls = log.read_text()
    assert TCMALLOC_INSTALL in calls and "pytest" not in calls  # stopped before the tests


def test_ci_tcmalloc_check_is_the_loaders_answer(tmp_path):
    """The script's check, run by a real Python: it installs tcmalloc exactly when ctypes cannot find it here."""
    import ctypes.util

    proc, log = _run_ci(tmp_path, apt_works=True, tcmalloc="real")
    assert proc.returncode == 0, proc.stderr
    installed = TCMALLOC_INSTALL in log.read_text().splitlines()
    assert installed == (ctypes.util.find_library("tcmalloc_minimal") is None)


def test_one_answer_to_are_we_in_ci(monkeypatch):
    """tests/test_web.py and tests/test_heap.py ask the same helper; CI=0/false/no is not CI."""
    import conftest
    import test_heap
    import test_web

    assert test_web.skip_or_fail is test_heap.skip_or_fail is conftest.skip_or_fail
    for value, expected in (("", False), ("0", False), ("false", False), ("No", False), ("1", True), ("true", True)):
        monkeypatch.setenv("CI", value)
        assert conftest.in_ci() is expected, value
    monkeypatch.delenv("CI")
    assert not conftest.in_ci()


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
