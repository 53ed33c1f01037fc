"""Every stage's target for a batch of records: the teacher (behind its cache) writes the chains under the reference
policy (run.py's docstring), stage by stage batched across the records, or (joint mode) one response per record
holding every stage; where the answer can be checked, the teacher answers too, and is checked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fslm.answers import answer_correct, checkable
from fslm.config import GenerationSettings, StackConfig, StageConfig
from fslm.data import DatasetRecord
from fslm.steps.distill.cache import TeacherCache
from fslm.steps.distill.filters import trim_to_sentence
from fslm.steps.distill.options import DistillOptions
from fslm.steps.distill.prompts import (
    hint_note,
    join_notes,
    joint_messages,
    options_note,
    reference_note,
    split_sections,
    teacher_messages,
)
from fslm.teachers import Teacher

NoteOf = Callable[[DatasetRecord], str | None]  # the note a record's requests carry (a hint, the reference), or None


@dataclass
class Chain:
    """One record's teacher chain: every stage's target, and what the checks found."""

    targets: dict[str, str] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)  # stages whose teacher output stopped at the token limit
    noted: bool = False  # the intermediate stages were written with the reference (shown) or a hint visible
    retried: bool = False  # the blind answer was wrong, so the chain was written again with a hint (hint-on-retry)
    hinted: bool = False  # ... and that hinted chain answered right, so it is the one kept
    teacher_answer: str | None = None  # the teacher's own final-stage answer, when it was asked for one
    correct: bool | None = None  # that answer checked against the gold one (None: not checkable)
    blind_correct: bool | None = None  # the first, blind chain's answer checked
    format_problem: tuple[str, str | None] | None = None  # joint mode: why the response has no usable sections


class Asker:
    """The teacher with the cache in front: one batched call per stage (or per joint response) for every record that
    still needs it."""

    def __init__(self, teacher: Teacher, cache: TeacherCache, stats: dict[str, int], options: DistillOptions):
        self.teacher, self.cache, self.stats, self.options = teacher, cache, stats, options

    def settings(self, base: GenerationSettings, sample: int, max_new_tokens: int | None = None) -> GenerationSettings:
        """`base` with the run's budget override (else `max_new_tokens`, else its own) and, with --samples, sampling."""
        budget = self.options.max_new_tokens or max_new_tokens
        settings = base.model_copy(update={"max_new_tokens": budget}) if budget is not None else base
        if self.options.samples > 1:  # every chain of a record sampled; the seed tells them apart
            seed = self.options.seed * 1000 + sample
            o = self.options
            settings = settings.model_copy(
                update={"temperature": o.sample_temperature, "top_p": o.sample_top_p, "seed": seed}
            )
        return settings

    def ask(
        self,
        stage: StageConfig,
        asks: list[tuple[DatasetRecord, dict[str, str], str | None]],
        sample: int,
        max_new_tokens: int | None = None,
    ) -> list[tuple[str, bool]]:
        """(text, cut) per (record, earlier outputs, note) for one stage."""
        settings = self.settings(stage.generation, sample, max_new_tokens)
        limits = self.options.word_limits
        messages = [teacher_messages(stage, rec, outputs, note, limits) for rec, outputs, note in asks]
        return self.ask_messages(stage.name, messages, settings)

    def ask_messages(
        self, label: str, messages: list[tuple[str, str]], settings: GenerationSettings
    ) -> list[tuple[str, bool]]:
        """(text, cut) per (system, user) pair: cache first, the teacher for the misses (`label`: the stage, or
        `joint`, names the cache entries and keys the teacher's prefix cache)."""
        keyed = [(m, TeacherCache.key(self.teacher.id, self.teacher.prompt_key(*m), settings)) for m in messages]
        misses: dict[str, tuple[str, str]] = {}
        for m, key in keyed:
            if self.cache.get(key) is None:
                misses.setdefault(key, m)
        self.stats["hits"] += len(keyed) - len(misses)
        empty: dict[str, dict[str, Any]] = {}  # empty answers are used now but never cached (a rerun asks again)
        if misses:
            keys = list(misses)

            def keep(i: int, o: Any) -> None:  # every answer is cached the moment it arrives
                self.stats["calls"] += 1
                self.stats["tokens"] += o.output_tokens
                self.stats["prompt_tokens"] += o.prompt_tokens
                entry = {
                    "key": keys[i],
                    "teacher": self.teacher.id,
                    "stage": label,
                    "text": o.text,
                    "prompt_tokens": o.prompt_tokens,
                    "output_tokens": o.output_tokens,
                    "finished": o.finished,
                }
                if o.text.strip():
                    self.cache.put([entry])
                else:
                    empty[keys[i]] = entry

            self.teacher.generate(list(misses.values()), settings, keep, label=label)
        results = []
        for _, key in keyed:
            entry = self.cache.get(key) or empty[key]
            text, cut = entry["text"].strip(), not entry.get("finished", True)
            if cut:
                trimmed = trim_to_sentence(text) if self.options.trim_cut else None
                if trimmed is not None:
                    text, cut = trimmed, False
                    self.stats["trimmed"] += 1
            results.append((text, cut))
        return results


def answer_budget(stage: StageConfig, records: list[DatasetRecord], count_tokens: Callable[[str], int]) -> int:
    """The final stage's teacher budget: its own, or for multiple choice what naming the longest option takes."""
    if records and all(r.choices for r in records):
        longest = max(count_tokens(c) for r in records for c in r.choices or [""])
        return min(stage.generation.max_new_tokens, 2 * longest + 16)
    return stage.generation.max_new_tokens


def joint_budget(config: StackConfig, records: list[DatasetRecord], count_tokens: Callable[[str], int]) -> int:
    """A joint response's budget: every earlier stage's, the final one's (sized to the data), and the headers."""
    earlier = sum(s.generation.max_new_tokens for s in config.stages[:-1])
    return earlier + answer_budget(config.final_stage, records, count_tokens) + 8 * len(config.stages)


def _no_note(_: DatasetRecord) -> None:
    return None


class ChainWriter:
    """The chains of a batch of records for one sample: written, answered and checked under the run's policy."""

    def __init__(
        self,
        config: StackConfig,
        asker: Asker,
        options: DistillOptions,
        sample: int = 0,
        count_tokens: Callable[[str], int] = lambda s: len(s.split()),
    ) -> None:
        self.config, self.asker, self.options, self.sample, self.count_tokens = (
            config,
            asker,
            options,
            sample,
            count_tokens,
        )
        self.final = config.final_stage
        self.shown = options.options == "shown"  # in every request; "answer": only where the teacher names its answer

    def write(self, chunk: list[DatasetRecord]) -> dict[str, Chain]:
        """Every record's chain, its final target set: the gold answer or reference, or the teacher's own answer."""
        policy, options = self.options.reference, self.options
        write = self.joint if options.teacher_mode == "joint" else self.stages
        chains = write(chunk, reference_note if policy == "shown" else _no_note)
        # Which records the teacher answers itself: checkable ones (unless the reference is shown, today's recipe),
        # and those whose final target comes from the teacher.
        checked = [r for r in chunk if policy != "shown" and checkable(r)]
        checked_ids = {r.id for r in checked}
        own = [r for r in chunk if r.id not in checked_ids and not (r.reference and options.final_from == "reference")]
        own_ids = {r.id for r in own}
        self.answer(checked + own, chains)
        for r in checked:
            chains[r.id].blind_correct = chains[r.id].correct
        if policy == "hint-on-retry":
            self._retry_with_hint(checked, chains, write)
        for r in chunk:
            chain = chains[r.id]
            if chain.format_problem is not None:
                continue
            if r.id in own_ids:
                chain.targets[self.final.name] = chain.teacher_answer or ""
            else:
                chain.targets[self.final.name] = r.reference or ""
                chain.cut.discard(self.final.name)  # the teacher's answer was only checked, not kept
        return chains

    def _retry_with_hint(
        self,
        checked: list[DatasetRecord],
        chains: dict[str, Chain],
        write: Callable[[list[DatasetRecord], NoteOf], dict[str, Chain]],
    ) -> None:
        """hint-on-retry: a checked-wrong chain written again with the gold answer as a hint, kept when it now
        answers right."""
        wrong = [r for r in checked if chains[r.id].correct is False]
        retried = write(wrong, hint_note)
        self.answer(wrong, retried)
        for r in wrong:
            chains[r.id].retried = True  # a failed retry keeps the blind chain, but the retry is still counted
            retried[r.id].retried, retried[r.id].hinted, retried[r.id].blind_correct = True, True, False
            if retried[r.id].correct:
                chains[r.id] = retried[r.id]

    def _told(self, note_of: NoteOf, final_answer: bool = False) -> NoteOf:
        """`note_of` with the options added where the teacher sees them (--options shown, or answer at the answer)."""
        if self.shown or (final_answer and self.options.options == "answer"):
            return lambda r: join_notes(note_of(r), options_note(r, final=final_answer))
        return note_of

    def stages(self, recs: list[DatasetRecord], note_of: NoteOf) -> dict[str, Chain]:
        """The earlier stages, one teacher call per stage for all records, each reading its own earlier outputs."""
        chains = {r.id: Chain(noted=note_of(r) is not None) for r in recs}
        told = self._told(note_of)
        for stage in self.config.stages[:-1]:
            texts = self.asker.ask(stage, [(r, chains[r.id].targets, told(r)) for r in recs], self.sample)
            for r, (text, cut) in zip(recs, texts, strict=True):
                chains[r.id].targets[stage.name] = text
                if cut:
                    chains[r.id].cut.add(stage.name)
        return chains

    def joint(self, recs: list[DatasetRecord], note_of: NoteOf) -> dict[str, Chain]:
        """One response per record; its final section is the teacher's own answer (unless a note was shown)."""
        config, final = self.config, self.final
        chains = {r.id: Chain(noted=note_of(r) is not None) for r in recs}
        if not recs:
            return chains
        limits = self.options.word_limits
        messages = [joint_messages(config, r, note_of(r), self.shown, limits) for r in recs]
        base = final.generation.model_copy(update={"repetition_penalty": 1.0})  # headers repeat by design
        settings = self.asker.settings(base, self.sample, joint_budget(config, recs, self.count_tokens))
        for r, (text, cut) in zip(recs, self.asker.ask_messages("joint", messages, settings), strict=True):
            chain = chains[r.id]
            sections = split_sections(text, config)
            chain.targets = {s.name: sections.targets.get(s.name, "") for s in config.stages}
            if sections.problem is not None:
                why = sections.problem + (" (cut at the token limit)" if cut else "")
                chain.format_problem = (why, sections.stage)
            elif cut:
                chain.cut.add(final.name)
            # Its own final section is its answer, unless a note was shown or the options wait for the answer call.
            if sections.problem is None and not chain.noted and not (self.options.options == "answer" and r.choices):
                chain.teacher_answer = chain.targets[final.name]
        return chains

    def answer(self, recs: list[DatasetRecord], chains: dict[str, Chain]) -> None:
        """The teacher's own final-stage answer (never with a note but the options), checked where it can be."""
        recs = [r for r in recs if chains[r.id].format_problem is None]
        if not recs:
            return
        need = [r for r in recs if chains[r.id].teacher_answer is None]
        if need:
            note = self._told(_no_note, final_answer=True)
            budget = answer_budget(self.final, need, self.count_tokens)
            texts = self.asker.ask(self.final, [(r, chains[r.id].targets, note(r)) for r in need], self.sample, budget)
            for r, (text, cut) in zip(need, texts, strict=True):
                chains[r.id].teacher_answer = text
                if cut:
                    chains[r.id].cut.add(self.final.name)
        for r in recs:
            chains[r.id].correct = answer_correct(chains[r.id].teacher_answer or "", r)
