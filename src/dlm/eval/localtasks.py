"""Multiple-choice tasks made from a prepared corpus's held-out split, written as lm-eval task files.

The real downstream tasks (LAMBADA, HellaSwag, ...) need downloads; these are built offline from any prepared data
directory, deterministically (one seed), so every arm of a comparison is scored on the same questions. Each task is
``OUT/<name>.yaml`` (lm-eval's task format, ``output_type: multiple_choice``) and ``OUT/<name>.jsonl`` (one question
a line: ``context``, 4 ``choices``, ``label`` the index of the true one, and where it came from); ``OUT/meta.json``
records the data fingerprint and the settings. Scored as any lm-eval multiple-choice task: the chosen answer is
argmax_k log p(choice_k | context) (``acc``) or argmax_k log p(choice_k | context) / bytes(choice_k) (``acc_norm``).

Kinds (``kinds``; task name ``dlm_<kind>``); the multiple-choice ones have N_CHOICES = 4 choices, so chance is 1/4
for acc and acc_norm:

- ``cloze`` (``dlm_cloze``): context = C tokens of a document ending at a word start; choices = the true next span
  of M tokens and 3 spans of M tokens that start at word starts elsewhere in the split (other documents, or the same
  document not overlapping the answer). Measures whether the model ranks the text that really follows above
  fluent text from elsewhere (local coherence: grammar across the cut, topic, speaker, metre).
- ``lastword`` (``dlm_lastword``): LAMBADA-style. Context = the C tokens before a word of at least 3 ASCII letters
  that ends a clause or line (the next character is one of ``.,;:!?`` or a newline); choices = that word and 3 other
  clause-final words of the split (distinct from it and each other, ignoring case), each after the same whitespace.
  Measures the prediction of one word from its context (metre, rhyme, names in the scene) against words that are
  equally frequent in that position.
- ``lastword_greedy`` (``dlm_lastword_greedy``, not made by default): LAMBADA's own scoring on the ``lastword``
  kind's positions whose word is one token after its context (in lm-eval's split): ``output_type: loglikelihood``,
  acc = greedy decoding gives the word (AR: the argmax after the context; a diffusion family: its sampler at
  temperature 0 filling the one masked position, ``dlm.eval.lmeval``), perplexity = exp(-mean log p(word |
  context)). No chance level (an argmax over the vocabulary); one-token words favour frequent ones.

Positions are drawn with ``numpy.random.default_rng([seed, kind index])``, so adding a kind leaves the others'
questions unchanged; the answer's index is uniform over the 4 places per question.

Token boundaries. Windows are cut from the split's token ids and decoded with the corpus's tokenizer. Whitespace
at the cut belongs to the choices (context = decoded window, right-stripped; every choice = that whitespace + its
left-stripped text), and the task's ``target_delimiter`` is "", so lm-eval asks for (context, choice) as written.
A question is kept only when (i) the decoded context and answer concatenate to the decoded window, and (ii) for
every choice lm-eval's Hugging Face split (the adapter's ``encode_pair``: whole = encode(context + choice),
c = encode(context)) keeps the context's ids as a prefix, whole[:|c|] = c, with a non-empty rest, so each choice is
scored as its own tokens after the same context ids.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlm.data.shards import open_split
from dlm.data.tokenizers import Tokenizer
from dlm.errors import DlmError
from dlm.eval.condgen import split_documents
from dlm.io import exclusive_lock, honour_umask, json_line, write_json_atomic

__all__ = ["DEFAULT_KINDS", "KINDS", "N_CHOICES", "Question", "task_name", "write_tasks"]

KINDS = ("cloze", "lastword", "lastword_greedy")
DEFAULT_KINDS = ("cloze", "lastword")
N_CHOICES = 4
FORMAT_VERSION = 1
MIN_WORD_LETTERS = 3
CLAUSE_END = ".,;:!?\n"
DISTRACTOR_TRIES = 200
WORD_RE = re.compile(r"(\s+)([A-Za-z]+)")
DESCRIPTIONS = {
    "cloze": "the true next span of M tokens after C tokens of context, against 3 spans from elsewhere in the split",
    "lastword": "the clause- or line-final word after C tokens of context, against 3 other clause-final words",
    "lastword_greedy": "greedy decoding after C tokens of context gives the clause-final word (one token)",
}
MULTIPLE_CHOICE = ("cloze", "lastword")


def task_name(kind: str) -> str:
    """The lm-eval task name of a kind: ``dlm_<kind>``."""
    return f"dlm_{kind}"


@dataclass(frozen=True)
class Question:
    """One question: ``choices[label]`` is the true continuation of ``context`` (the greedy kind: the only
    choice); the answer starts at token ``offset`` of document ``doc`` of the split."""

    context: str
    choices: list[str]
    label: int
    doc: int
    offset: int


class _Corpus:
    """The split's documents (token ids), the tokenizer, and per id whether its text starts with whitespace."""

    def __init__(self, docs: list[np.ndarray], tok: Tokenizer) -> None:
        self.docs, self.tok = docs, tok
        self.pieces = [tok.decode([v]) for v in range(tok.vocab_size)]
        self.ws_V = np.array([p[:1].isspace() for p in self.pieces], dtype=bool)

    def word_starts(self, before: int, after: int) -> list[tuple[int, int]]:
        """(doc, e) with a token whose text starts with whitespace at e, ``before`` tokens in front of it and
        ``after`` from it on."""
        out = []
        for d, doc in enumerate(self.docs):
            hits = np.flatnonzero(self.ws_V[doc[before : max(before, doc.size - after + 1)]])
            out += [(d, int(e) + before) for e in hits]
        return out

    def decode(self, d: int, a: int, b: int) -> str:
        return self.tok.decode(self.docs[d][a:b].tolist())

    def cut(self, d: int, e: int, end: int, before: int) -> tuple[str, str, str] | None:
        """(context, lead, answer) of the window [e - before, end) cut at e: the context right-stripped, the
        whitespace at the cut, the answer's text after it; None when the two decodings do not concatenate to the
        window's or a part is empty."""
        raw_ctx, raw_ans = self.decode(d, e - before, e), self.decode(d, e, end)
        if raw_ctx + raw_ans != self.decode(d, e - before, end):
            return None
        ctx, ans = raw_ctx.rstrip(), raw_ans.lstrip()
        lead = raw_ctx[len(ctx) :] + raw_ans[: len(raw_ans) - len(ans)]
        return (ctx, lead, ans) if ctx and ans.strip() else None

    def splits_cleanly(self, context_ids: list[int], context: str, choice: str) -> bool:
        """lm-eval's split of (context, choice) keeps the context's ids and leaves a non-empty continuation."""
        whole = self.tok.encode(context + choice)
        return len(whole) > len(context_ids) and whole[: len(context_ids)] == context_ids


def _assemble(
    corpus: _Corpus, ctx: str, lead: str, answer: str, draw: Callable[[], str | None], rng: np.random.Generator,
    d: int, e: int,
) -> Question | None:  # fmt: skip
    """The question with ``answer`` and N_CHOICES - 1 distinct distractors from ``draw`` (texts after the lead),
    the answer at a uniform index; None when the answer does not split cleanly or too few distractors do."""
    ctx_ids = corpus.tok.encode(ctx)
    if not corpus.splits_cleanly(ctx_ids, ctx, lead + answer):
        return None
    texts, seen = [answer], {_key(answer)}
    for _ in range(DISTRACTOR_TRIES):
        text = draw()
        if text is None or not text.strip() or _key(text) in seen:
            continue
        if corpus.splits_cleanly(ctx_ids, ctx, lead + text):
            texts.append(text)
            seen.add(_key(text))
            if len(texts) == N_CHOICES:
                break
    else:
        return None
    label = int(rng.integers(N_CHOICES))
    order = [*texts[1 : label + 1], answer, *texts[label + 1 :]]
    return Question(ctx, [lead + t for t in order], label, d, e)


def _key(text: str) -> str:
    """Two choices are the same when they differ only in case and surrounding whitespace."""
    return text.strip().lower()


def cloze_questions(
    corpus: _Corpus, n: int, context_tokens: int, span_tokens: int, rng: np.random.Generator
) -> list[Question]:
    """``n`` cloze questions (module docstring): context = doc[e - C : e], answer = doc[e : e + M] at a word
    start e; distractors = the M tokens from other word starts, not overlapping the answer."""
    C, M = context_tokens, span_tokens
    starts = corpus.word_starts(C, M)
    pool = corpus.word_starts(0, M)

    def draw_for(d: int, e: int) -> Callable[[], str | None]:
        def draw() -> str | None:
            d2, e2 = pool[int(rng.integers(len(pool)))]
            if d2 == d and abs(e2 - e) < M:
                return None
            return corpus.decode(d2, e2, e2 + M).lstrip()

        return draw

    def make(d: int, e: int) -> Question | None:
        parts = corpus.cut(d, e, e + M, C)
        return None if parts is None else _assemble(corpus, *parts, draw_for(d, e), rng, d, e)

    where = f"word starts with {C} context tokens before and {M} span tokens from them"
    return _collect(starts, make, n, rng, where)


def clause_final_words(corpus: _Corpus, before: int) -> list[tuple[int, int, int]]:
    """(doc, e, f): doc[e:f] is whitespace + a word of at least MIN_WORD_LETTERS ASCII letters, made of tokens
    that after the first are letters only, followed by a token starting with a clause end; e >= ``before``."""
    out = []
    for d, e in corpus.word_starts(before, 1):
        doc, f = corpus.docs[d], e + 1
        while f < doc.size and corpus.pieces[doc[f]].isascii() and corpus.pieces[doc[f]].isalpha():
            f += 1
        nxt = corpus.pieces[doc[f]][:1] if f < doc.size else ""
        if not nxt or nxt not in CLAUSE_END:
            continue
        m = WORD_RE.fullmatch("".join(corpus.pieces[t] for t in doc[e:f]))
        if m is not None and len(m.group(2)) >= MIN_WORD_LETTERS:
            out.append((d, e, f))
    return out


def lastword_questions(corpus: _Corpus, n: int, context_tokens: int, rng: np.random.Generator) -> list[Question]:
    """``n`` lastword questions (module docstring): context = doc[e - C : e], answer = the clause-final word
    doc[e:f]; distractors = other clause-final words of the split."""
    C = context_tokens
    words = clause_final_words(corpus, 0)
    starts = [(d, e) for d, e, _ in words if e >= C]
    end = {(d, e): f for d, e, f in words}
    texts = [corpus.decode(d, e, f).strip() for d, e, f in words]

    def make(d: int, e: int) -> Question | None:
        parts = corpus.cut(d, e, end[(d, e)], C)
        if parts is None:
            return None
        return _assemble(corpus, *parts, lambda: texts[int(rng.integers(len(texts)))], rng, d, e)

    where = f"clause-final words (>= {MIN_WORD_LETTERS} letters) with {C} context tokens before them"
    return _collect(starts, make, n, rng, where)


def greedy_questions(corpus: _Corpus, n: int, context_tokens: int, rng: np.random.Generator) -> list[Question]:
    """``n`` lastword_greedy questions (module docstring): the clause-final words that lm-eval's split of
    (context, word) makes one token; ``choices`` = [the word], ``label`` 0."""
    C = context_tokens
    starts = clause_final_words(corpus, C)
    end = {(d, e): f for d, e, f in starts}

    def make(d: int, e: int) -> Question | None:
        parts = corpus.cut(d, e, end[(d, e)], C)
        if parts is None:
            return None
        ctx, lead, ans = parts
        ctx_ids = corpus.tok.encode(ctx)
        whole = corpus.tok.encode(ctx + lead + ans)
        one = len(whole) == len(ctx_ids) + 1 and whole[:-1] == ctx_ids
        return Question(ctx, [lead + ans], 0, d, e) if one else None

    where = f"clause-final words (>= {MIN_WORD_LETTERS} letters) with {C} context tokens before them"
    return _collect([(d, e) for d, e, _ in starts], make, n, rng, where, "whose word is one token after its context")


def _collect(
    starts: list[tuple[int, int]], make: Callable[[int, int], Question | None], n: int, rng: np.random.Generator,
    where: str, usable: str = "whose choices split at the context's tokens",
) -> list[Question]:  # fmt: skip
    """The first ``n`` questions ``make`` accepts over the candidates in a seeded order, in split order; DlmError
    when there are fewer."""
    if len(starts) < n:
        raise DlmError(f"the split has only {len(starts)} {where}, fewer than --n {n}: lower --n or --context-tokens")
    out = []
    for i in rng.permutation(len(starts)).tolist():
        if (q := make(*starts[i])) is not None:
            out.append(q)
            if len(out) == n:
                return sorted(out, key=lambda q: (q.doc, q.offset))
    raise DlmError(
        f"only {len(out)} of the split's {len(starts)} {where} make questions {usable}, fewer than --n {n}: lower --n"
    )


# ----------------------------------------------------------------------------------------------- files


def _check(n: int, context_tokens: int, span_tokens: int, seed: int, kinds: Sequence[str]) -> list[str]:
    for what, v, low in (("--n", n, 1), ("--context-tokens", context_tokens, 1), ("--span-tokens", span_tokens, 1),
                         ("--task-seed", seed, 0)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise DlmError(f"{what} must be an integer >= {low}, got {v!r}")
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise DlmError(
            f"unknown task kind {', '.join(map(repr, unknown)) or '(none)'} (choose from {', '.join(KINDS)})"
        )
    return kinds


def task_yaml(name: str, data_file: Path, multiple_choice: bool = True) -> str:
    """lm-eval's task file of a local task over ``data_file`` (JSON-quoted strings are YAML): multiple choice
    (acc, acc_norm), else one target per document (``loglikelihood``: acc = greedy, perplexity)."""
    if multiple_choice:
        how = "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
        metrics = [("acc", "mean", "true"), ("acc_norm", "mean", "true")]
    else:
        how = "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: target\n"
        metrics = [("acc", "mean", "true"), ("perplexity", "perplexity", "false")]
    listed = "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: {h}\n" for m, a, h in metrics)
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
        f'test_split: test\n{how}target_delimiter: ""\nmetric_list:\n{listed}metadata:\n  version: {FORMAT_VERSION}\n'
    )


def _request(s: Any, split: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What the tasks depend on: the split's token ids, the tokenizer, the settings."""
    return {
        "format_version": FORMAT_VERSION,
        "data": {
            "inputs_hash": s.meta.get("inputs_hash"),
            "split": split,
            "split_sha256": s.stats.get("sha256", {}).get("ids"),
            "tokenizer": s.meta["tokenizer"]["fingerprint"],
        },
        "settings": settings,
    }


def _existing(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """meta.json of ``out`` when it holds tasks of this request; None when ``out`` is missing or empty;
    DlmError when it holds something else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or "request" not in meta:
        raise DlmError(f"{out} exists and does not hold dlm local tasks: give a new or empty directory")
    if meta["request"] != request:
        raise DlmError(
            f"{out} holds local tasks made from other data or settings ({_settings_line(meta['request'])}): "
            "give another directory, or delete it"
        )
    return meta


def _settings_line(request: dict[str, Any]) -> str:
    s = request.get("settings", {})
    return ", ".join(f"{k} {v}" for k, v in s.items())


def write_tasks(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    n: int = 100,
    context_tokens: int = 64,
    span_tokens: int = 8,
    seed: int = 0,
    kinds: Sequence[str] = DEFAULT_KINDS,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Write the local tasks of ``kinds`` made from ``split`` of the prepared ``data_dir`` into ``out_dir``
    (module docstring); returns their lm-eval names. ``n`` questions per task, contexts of ``context_tokens``,
    cloze spans of ``span_tokens``. The directory is written under a temporary name and renamed; an existing one
    made from the same data and settings is reused (``log`` says so); one made otherwise is refused."""
    kinds = _check(n, context_tokens, span_tokens, seed, kinds)
    s = open_split(data_dir, split)
    settings = {"n": n, "context_tokens": context_tokens, "span_tokens": span_tokens, "seed": seed, "kinds": kinds}
    request = _request(s, split, settings)
    out = Path(out_dir).resolve()
    names = [task_name(k) for k in kinds]
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock", out):
        meta = _existing(out, request)
        if meta is not None and meta.get("location") == str(out):
            if log is not None:
                log(f"reused the local tasks in {out}")
            return names
        corpus = _Corpus(split_documents(s), s.tokenizer())
        questions = {}
        for kind in kinds:
            rng = np.random.default_rng([seed, KINDS.index(kind)])
            if kind == "cloze":
                questions[kind] = cloze_questions(corpus, n, context_tokens, span_tokens, rng)
            elif kind == "lastword":
                questions[kind] = lastword_questions(corpus, n, context_tokens, rng)
            else:
                questions[kind] = greedy_questions(corpus, n, context_tokens, rng)
        _write_dir(out, request, s, questions)
    if log is not None:
        log(f"wrote {', '.join(names)} ({n} questions each) to {out}")
    return names


def _write_dir(out: Path, request: dict[str, Any], s: Any, questions: dict[str, list[Question]]) -> None:
    """All files into a temporary sibling directory, then renamed to ``out`` (an old ``out`` moved aside first
    and deleted after)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        honour_umask(tmp, executable=True)
        tasks = {}
        for kind, qs in questions.items():
            name = task_name(kind)
            lines = [json_line({"id": i, **asdict(q), "target": q.choices[q.label]}) + "\n" for i, q in enumerate(qs)]
            (tmp / f"{name}.jsonl").write_text("".join(lines))
            mc = kind in MULTIPLE_CHOICE
            (tmp / f"{name}.yaml").write_text(task_yaml(name, out / f"{name}.jsonl", multiple_choice=mc))
            tasks[name] = {"kind": kind, "measures": DESCRIPTIONS[kind], "questions": len(qs),
                           "choices": N_CHOICES if mc else 1, "chance": 1 / N_CHOICES if mc else None}  # fmt: skip
            if mc:
                tasks[name]["answer_index_counts"] = np.bincount([q.label for q in qs], minlength=N_CHOICES).tolist()
        for p in tmp.iterdir():
            honour_umask(p)
        meta = {"request": request, "location": str(out), "data_dir": str(Path(s.data_dir).resolve()),
                "tokenizer": s.meta["tokenizer"]["name"], "tasks": tasks}  # fmt: skip
        write_json_atomic(tmp / "meta.json", meta)
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
