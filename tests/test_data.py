"""Dataset readers: every format, field mappings, bad rows by file and line, --strict, reproducible samples."""

from __future__ import annotations

import json

import pytest

from fslm.contamination import TEST_SPLITS, BenchmarkIndex
from fslm.data import normalise, read_dataset, record_id
from fslm.errors import FslmError


def write_jsonl_bytes(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_alpaca_json_list_with_bad_rows(tmp_path):
    rows = [
        {"instruction": "Give three tips.", "input": "", "output": "Eat, sleep, move."},
        {"input": "no instruction here", "output": "x"},
        {"instruction": "Summarise.", "input": "Some text.", "output": 42},
        {"instruction": "   ", "output": "blank instruction"},
        ["not", "an", "object"],
        {"instruction": {"nested": 1}, "output": "y"},
    ]
    text = json.dumps(rows, indent=2)
    path = tmp_path / "a.json"
    # A non-UTF-8 byte inside one row's string: that row alone is skipped.
    bad_utf8 = b'  {"instruction": "caf\xe9 menu", "output": "z"}\n'
    data = text.encode()[: text.rfind("]")].rstrip() + b",\n" + bad_utf8 + b"]\n"
    path.write_bytes(data)

    seen = []
    ds = read_dataset(path, on_bad=seen.append)
    assert [r.instruction for r in ds.records] == ["Give three tips.", "Summarise."]
    assert ds.records[0].input is None and ds.records[1].input == "Some text." and ds.records[1].reference == "42"
    assert ds.rows == 7 and len(ds.bad) == 5 and seen == ds.bad
    lines = data.decode("utf-8", "replace").splitlines()
    for bad in ds.bad:
        assert bad.file == str(path)
        assert lines[bad.line - 1].strip().startswith(("{", "[")), bad  # the line where that row starts
    reasons = " | ".join(b.reason for b in ds.bad)
    assert "missing instruction" in reasons and "UTF-8" in reasons and "list" in reasons and "dict" in reasons
    assert ds.records[1].index == 2  # the row's position in the file, bad rows included

    with pytest.raises(FslmError, match=rf"{path.name}:\d+: missing instruction"):
        read_dataset(path, strict=True)


def test_jsonl_broken_lines_and_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl_bytes(
        path,
        [
            b'{"instruction": "one", "output": "1"}',
            b'{"instruction": "two", "output": ',  # broken JSON
            b"",
            b'{"instruction": "thr\xffee"}',  # not UTF-8
            b'{"instruction": "four"}',
        ],
    )
    ds = read_dataset(path)
    assert [r.instruction for r in ds.records] == ["one", "four"]
    assert [(b.line, b.reason.split(":")[0]) for b in ds.bad] == [
        (2, "broken JSON line"),
        (4, "not valid UTF-8 (byte 21 of the line)"),
    ]
    assert ds.records[1].line == 5 and ds.records[1].reference is None
    with pytest.raises(FslmError, match=r"d\.jsonl:2: broken JSON line"):
        read_dataset(path, strict=True)


def test_broken_json_list_is_fatal_with_line(tmp_path):
    path = tmp_path / "b.json"
    path.write_text('[\n {"instruction": "a"},\n {"instruction": "b",,}\n]\n')
    with pytest.raises(FslmError, match=r"b\.json:3:\d+: broken JSON"):
        read_dataset(path)


def test_csv_mapping_and_bad_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"question,context,answer\n"
        b'"What is 2+2?",,4\n'
        b'"multi\nline question",ctx,yes\n'
        b",no question,x\n"
        b"too,many,cells,here\n"
        b"caf\xe9?,,x\n"
        b"last,,y\n"
    )
    ds = read_dataset(path, instruction_field="question", input_field="context", output_field="answer")
    assert [(r.instruction, r.input, r.reference, r.line) for r in ds.records] == [
        ("What is 2+2?", None, "4", 2),
        ("multi\nline question", "ctx", "yes", 3),
        ("last", None, "y", 8),
    ]
    assert [b.line for b in ds.bad] == [5, 6, 7]
    # Without the mapping, question/answer columns are taken for GSM8K's layout (no input field).
    auto = read_dataset(path)
    assert auto.format == "gsm8k" and [r.input for r in auto.records] == [None, None, None]
    other = tmp_path / "other.csv"
    other.write_text("prompt,response\nhi,hello\n")
    with pytest.raises(FslmError, match=r"other\.csv: no usable records"):
        read_dataset(other)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"instruction": ["a", None, "c"], "input": ["x", None, None], "output": ["1", "2", "3"]})
    pq.write_table(table, path)
    ds = read_dataset(path)
    assert [(r.instruction, r.input, r.reference) for r in ds.records] == [("a", "x", "1"), ("c", None, "3")]
    assert [b.line for b in ds.bad] == [2]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(FslmError, match="cannot read as Parquet"):
        read_dataset(tmp_path / "broken.parquet")


def test_builtin_formats_detected(tmp_path):
    si = tmp_path / "seed.jsonl"
    si.write_text(
        json.dumps({"id": "t0", "instruction": "Antonym?", "instances": [{"input": "hot", "output": "cold"}]}) + "\n"
    )
    ds = read_dataset(si)
    assert ds.format == "self-instruct"
    assert (ds.records[0].instruction, ds.records[0].input, ds.records[0].reference) == ("Antonym?", "hot", "cold")

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    ds = read_dataset(gsm)
    assert ds.format == "gsm8k" and ds.records[0].reference.endswith("#### 2") and ds.records[0].input is None
    # An explicit format wins over detection.
    with pytest.raises(FslmError, match="no usable records"):
        read_dataset(gsm, format="alpaca")
    with pytest.raises(FslmError, match="unknown dataset format"):
        read_dataset(gsm, format="dolly")


def test_limit_seed_reproducible_and_dedup(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Instruction number {i}", "output": str(i)} for i in range(50)]
    rows.append({"instruction": "instruction NUMBER 7!", "output": "dup"})  # same after normalisation
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    full = read_dataset(path)
    assert len(full.records) == 50 and full.duplicates == 1
    a = read_dataset(path, limit=10, seed=3)
    b = read_dataset(path, limit=10, seed=3)
    c = read_dataset(path, limit=10, seed=4)
    ids = [r.id for r in a.records]
    assert ids == [r.id for r in b.records] and ids != [r.id for r in c.records]
    assert [r.index for r in a.records] == sorted(r.index for r in a.records)  # file order kept
    assert len(set(ids)) == 10
    assert len(read_dataset(path, limit=500).records) == 50


def test_ids_and_normalisation():
    assert normalise("  Héllo,   WORLD!! ") == "héllo world"
    assert record_id("Hello world", None) == record_id("hello, world.", "")
    assert record_id("Hello world", "x") != record_id("Hello world", None)
    assert len(record_id("a", None)) == 16


def test_contamination_index_on_planted_items(tmp_path):
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text(
        json.dumps({"id": "q1", "question": {"stem": "Which gas do plants absorb?", "choices": []}, "answerKey": "A"})
        + "\n"
    )
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "astronomy_test.csv").write_text('"What is the closest star to Earth?",a,b,c,d,A\n')
    index = BenchmarkIndex.load(tmp_path)
    assert index.sizes == {"arc_easy": 1, "mmlu": 1}
    assert set(index.missing) == {s.name for s in TEST_SPLITS} - {"arc_easy", "mmlu"}
    report = index.check(
        [
            ("a", "which gas do plants ABSORB", None),  # normalised match
            ("b", "Answer the question.", "What is the closest star to Earth?"),  # in the input
            ("c", "Which gas do plants emit?", None),
            # a multiple-choice training record carries the evaluation's prompt frame (fslm.choices)
            ("d", "Question: Which gas do plants absorb?\nAnswer:", None),
        ]
    )
    assert report.matched == {"a": ["arc_easy"], "b": ["mmlu"], "d": ["arc_easy"]}
    assert report.per_split == {"arc_easy": 2, "mmlu": 1} and report.checked == 4
    with pytest.raises(FslmError, match="no benchmark test split"):
        BenchmarkIndex.load(tmp_path / "arc")
