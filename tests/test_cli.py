"""The CLI: init/info/run, `--json` shape, and one clear line with exit code 2 for each bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import make_adapter, make_model_dir
from typer.testing import CliRunner

from fslm.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_init_info_run_json(tmp_path, tiny_model):
    arch, model_dir = tiny_model
    d = tmp_path / "s"
    r = invoke("init", d, "--base", model_dir)
    assert r.exit_code == 0, r.output
    assert (d / "stack.yaml").is_file() and (d / "adapters").is_dir() and (d / "README.md").is_file()
    make_adapter(model_dir, arch, d / "adapters" / "answer", seed=5)

    r = invoke("info", d)
    assert r.exit_code == 0, r.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in r.stdout.splitlines() if line.startswith("│")]
    assert [(row[1], row[3]) for row in rows] == [
        ("intent", "none (base)"),
        ("plan", "none (base)"),
        ("reasoning", "none (base)"),
        ("answer", "adapters/answer"),
    ]
    assert rows[3][4].endswith(" M") and [row[4] for row in rows[:3]] == ["-", "-", "-"]  # adapter parameters

    r = invoke("run", d, "Give three tips for staying healthy.", "--json", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    trace = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert set(trace) >= {"instruction", "stages", "answer"}
    assert [s["name"] for s in trace["stages"]] == ["intent", "plan", "reasoning", "answer"]
    for s in trace["stages"]:
        assert set(s) >= {"name", "output", "prompt_tokens", "output_tokens", "seconds"}
    assert trace["stages"][-1]["adapter"] == "answer" and trace["stages"][0]["adapter"] is None
    assert trace["answer"] == trace["stages"][-1]["output"]

    r = invoke("run", d, "Give three tips.", "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    # one panel per stage, titled with what it ran on and how many tokens it wrote, then the answer panel
    titles = re.findall(r"╭─ (\w+)(?: · (base model|adapter \w+) · (\d+) tokens)?", r.stdout)
    assert [t[:2] for t in titles] == [
        ("intent", "base model"),
        ("plan", "base model"),
        ("reasoning", "base model"),
        ("answer", "adapter answer"),
        ("answer", ""),
    ]
    assert all(1 <= int(t[2]) <= 3 for t in titles[:4])


def test_run_prompts_shows_each_stage_prompt(tmp_path, tiny_llama):
    """`fslm run --prompts`: each stage's full prompt, as a panel before its output, and in `--json`."""
    from fslm import Stack

    d = tmp_path / "s"
    assert invoke("init", d, "--base", tiny_llama).exit_code == 0
    question = "Explain why the sky is [bold]blue[/bold] [/x]."  # shown as written, not read as rich markup
    expect = [s.prompt for s in Stack.load(d).run(question, max_new_tokens=2).stages]
    assert len(set(expect)) == 4 and all(question in p for p in expect)

    r = invoke("run", d, question, "--json", "--max-new-tokens", "2", "--prompts")
    assert r.exit_code == 0, r.output
    assert [s["prompt"] for s in json.loads(r.stdout)["stages"]] == expect
    r = invoke("run", d, question, "--json", "--max-new-tokens", "2")
    assert all("prompt" not in s for s in json.loads(r.stdout)["stages"])

    r = invoke("run", d, question, "--max-new-tokens", "2", "--prompts")
    assert r.exit_code == 0, r.output
    titles = re.findall(r"╭─+ (\w+)( prompt)? ", r.stdout)
    names = ["intent", "plan", "reasoning", "answer"]
    assert titles == [(n, p) for n in names for p in (" prompt", "")] + [("answer", "")]
    shown = []  # the text of each prompt panel (each line is shorter than the terminal: no wrapping)
    for panel in r.stdout.split("╭")[1:]:
        header, *body = panel.split("╰")[0].splitlines()
        if " prompt " in header:
            shown.append("\n".join(line[2:-1].rstrip() for line in body).strip())
    assert shown == [p.strip() for p in expect]
    plain = invoke("run", d, question, "--max-new-tokens", "2")
    assert " prompt " not in plain.stdout and question not in plain.stdout


def _bad(tmp_path, tiny_llama):
    """Each case: (args builder, expected text in the error line)."""
    good = tmp_path / "good"
    invoke("init", good, "--base", tiny_llama)
    broken = tmp_path / "broken"
    invoke("init", broken, "--base", tiny_llama)
    text = (broken / "stack.yaml").read_text()
    (broken / "stack.yaml").write_text(text.replace("reads: [intent]", "reads: [intent", 1))
    unknown_var = tmp_path / "unknown_var"
    invoke("init", unknown_var, "--base", tiny_llama)
    text = (unknown_var / "stack.yaml").read_text()
    (unknown_var / "stack.yaml").write_text(text.replace("{{ intent }}", "{{ mood }}", 1))
    small = make_model_dir(tmp_path, "llama", chat=True, context=48)
    short = tmp_path / "short"
    invoke("init", short, "--base", small)
    return {
        "missing dir": (["run", tmp_path / "nope", "hi"], "no such directory"),
        "not a stack": (["info", tmp_path], "not a stack directory"),
        "malformed yaml": (["run", broken, "hi"], "stack.yaml:"),
        "unknown variable": (["info", unknown_var], "unknown variable 'mood'"),
        "empty instruction": (["run", good, "   "], "instruction is empty"),
        "too long": (["run", short, "word " * 100], "context is 48 tokens"),
        "unknown alias": (["init", tmp_path / "x", "--base", "gpt-17-mega"], "unknown base model 'gpt-17-mega'"),
        "unknown recipe": (["init", tmp_path / "y", "--recipe", "paper5"], "unknown recipe 'paper5'"),
        "init over stack": (["init", good, "--base", tiny_llama], "already holds a stack"),
    }


def test_bad_inputs_exit_2_with_one_line(tmp_path, tiny_llama):
    for case, (args, expected) in _bad(tmp_path, tiny_llama).items():
        r = invoke(*args)
        assert r.exit_code == 2, f"{case}: exit {r.exit_code}\n{r.output}"
        assert expected in r.stderr, f"{case}: {r.stderr!r}"
        assert "Traceback" not in r.output
        assert r.stderr.strip().startswith("error:"), f"{case}: {r.stderr!r}"
        assert r.exception is None or isinstance(r.exception, SystemExit), case


def test_console_script_bad_input_has_no_traceback(tmp_path):
    """The real process: one line on stderr, exit code 2."""
    p = subprocess.run(
        [sys.executable, "-m", "fslm", "info", str(tmp_path / "absent")], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error:"), p.stderr
    assert p.stdout == ""


@pytest.mark.slow
def test_embedded_default_model_end_to_end(tmp_path):
    """The README's main job: `fslm init` + `fslm run --json` on the embedded SmolLM2-135M-Instruct."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    d = tmp_path / "s"
    subprocess.run([sys.executable, "-m", "fslm", "init", str(d)], check=True, env=env, timeout=300)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "fslm",
            "run",
            str(d),
            "Give three tips for staying healthy.",
            "--json",
            "--max-new-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    trace = json.loads(p.stdout)
    assert [s["name"] for s in trace["stages"]] == ["intent", "plan", "reasoning", "answer"]
    assert all(s["output"].strip() for s in trace["stages"])
    assert trace["answer"].strip()
