"""The web page at / in real headless Chromium: type, run, one card per stage fills in as it streams, then the answer."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import in_ci, make_model_dir, skip_or_fail
from test_serve import running, tiny_stack_dir

from fslm.config import load_config, save_config
from fslm.stack import Stack

CHROMIUM = os.environ.get("FSLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def missing(reason: str) -> None:
    """Skip on a developer's machine; fail under CI (`CI` set, as .ci/run does): a green CI includes this test."""
    skip_or_fail(f"{reason}: the web-page test cannot run" if in_ci() else reason)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        missing(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set FSLM_CHROMIUM)")
    try:
        import playwright.sync_api as playwright
    except ImportError:
        missing("python playwright is not installed")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_page_streams_stage_cards_then_the_answer(browser, tmp_path, models_root):
    directory = tiny_stack_dir(tmp_path, make_model_dir(models_root, "llama", chat=True), adapters=("plan",))
    config = load_config(directory)
    for stage in config.stages:  # enough tokens per stage that each card shows several pieces
        stage.generation.max_new_tokens = 16
    save_config(config, directory)
    stack = Stack.load(directory)
    names = stack.config.stage_names
    expected = stack.run("Explain why the sky is blue.")
    # Pace the model (50 ms per text delta) so each delta reaches the page in its own network read: a tiny model
    # is fast enough to send a whole stage in one TCP segment, which a page could then not show piece by piece.
    generate = stack.backend.generate

    def paced(prompts, adapter, settings, label="", on_text=None):
        def slowly(row: int, delta: str) -> None:
            time.sleep(0.05)
            on_text(row, delta)

        return generate(prompts, adapter, settings, label=label, on_text=slowly if on_text else None)

    stack.backend.generate = paced
    with running(stack) as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('title').textContent.includes('answer')")
        # Record every text the cards show while streaming, and whether the answer was shown yet.
        page.evaluate(
            """() => { window.seen = [];
            new MutationObserver(() => { for (const c of document.querySelectorAll('.card.stage'))
              window.seen.push([c.dataset.stage, c.querySelector('pre').textContent,
                                document.getElementById('answer').hidden]); })
            .observe(document.getElementById('stages'), {subtree: true, childList: true, characterData: true}); }"""
        )
        page.fill("#instruction", "Explain why the sky is blue.")
        page.click("#run")
        page.wait_for_selector("#answer:not([hidden])", timeout=60_000)
        cards = page.locator(".card.stage")
        assert [cards.nth(i).get_attribute("data-stage") for i in range(cards.count())] == names
        for i, result in enumerate(expected.stages):
            assert cards.nth(i).locator("pre").text_content() == result.output
            assert "done" in (cards.nth(i).get_attribute("class") or "")
        assert "adapter plan" in cards.nth(1).locator(".meta").text_content()
        assert page.locator("#answer-text").text_content() == expected.answer
        assert page.locator("#status").text_content() == "done"
        seen = page.evaluate("window.seen")
        for result in expected.stages:
            # Each card grew piece by piece, before the answer was shown: several texts, each extending the last.
            texts = list(dict.fromkeys(t for s, t, hidden in seen if s == result.name and t and hidden))
            partial = [t for t in texts if t != result.output]
            assert len(partial) >= 3, f"{result.name}: {len(partial)} partial text(s) before the final one: {texts}"
            assert all(b.startswith(a) for a, b in zip(partial, partial[1:], strict=False)), texts
        # An empty instruction is refused in the page without a request.
        page.fill("#instruction", "  ")
        page.click("#run")
        assert "Type an instruction" in page.locator("#error").text_content()
        assert not errors, errors
        page.close()
    del stack.backend.generate
