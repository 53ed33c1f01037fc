"""Stage prompts: a Jinja2 template for the user message, wrapped in the tokenizer's chat template.

Training (`fslm train`) and inference (`Stack.run`) both call `render_stage_prompt`, so an adapter always sees
at inference exactly the text it was trained on.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

_env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)

# Used when the tokenizer has no chat template (e.g. Pythia, the paper's model).
PLAIN_FORMAT = "{system}\n\n{user}\n\n### Response:\n"


def template_variables(template: str) -> set[str]:
    """The variables a template uses; raises SyntaxError (with the line) on a broken template."""
    try:
        return set(meta.find_undeclared_variables(_env.parse(template)))
    except jinja2.TemplateSyntaxError as e:
        raise SyntaxError(f"template line {e.lineno}: {e.message}") from None


@lru_cache(maxsize=256)
def _compiled(template: str) -> jinja2.Template:
    return _env.from_string(template)


def render_user_message(template: str, variables: dict[str, Any]) -> str:
    return _compiled(template).render(**variables).strip()


def stage_variables(instruction: str, input: str | None, outputs: dict[str, str], reads: list[str]) -> dict[str, str]:
    """The template namespace of a stage: the instruction, the input ('' when none) and the outputs it reads."""
    variables = {"instruction": instruction.strip(), "input": (input or "").strip()}
    variables.update({name: outputs[name] for name in reads})
    return variables


# How a stage's prompt is written. full: the stage's role as the system message and its template as the user
# message, what a bare base model needs to know its task. compact: an adapter trained on it has learned its role, so
# the prompt holds only the stage's name (which tells a multitask adapter the step), the instruction, the input and
# the earlier stages' text, each under its name, without the role text a trained stage no longer needs
# (docs/train.md, "Prompt forms"; what it saves per stack query is still to be measured: benchmarks/prompt_forms.py).
PROMPT_FORMS = ("full", "compact")


def compact_user_message(instruction: str, input: str | None, outputs: dict[str, str], reads: list[str]) -> str:
    """The compact form's user message: the instruction, the input, then `Name: text` per earlier stage read."""
    parts = [instruction.strip()]
    if input and input.strip():
        parts.append(input.strip())
    parts += [f"{name.replace('_', ' ').capitalize()}: {outputs[name].strip()}" for name in reads]
    return "\n\n".join(parts)


def wrap_prompt(tokenizer: Any, system: str, user: str, fmt: str) -> str:
    """Turn (system, user) into the model's prompt text, ending where the assistant's answer begins."""
    if not uses_chat_template(tokenizer, fmt):
        return PLAIN_FORMAT.format(system=system, user=user)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError:
        # Some chat templates (e.g. Gemma's) refuse a system role: fold it into the user turn.
        merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def uses_chat_template(tokenizer: Any, fmt: str) -> bool:
    return fmt == "chat" or (fmt == "auto" and bool(getattr(tokenizer, "chat_template", None)))
