"""Training examples for `rag tune`: qa-pool questions put into exactly the chain's prompt.

Each example is the question with its gold passage (a window of the context holding the
answer) at a random position among 2-3 passages of other contexts, answered
`"{answer} [n]"`; a share of examples lose the gold passage and are answered NOT_FOUND.
Everything is deterministic in (seed, index), so a resumed run sees the same examples.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from langchain_core.documents import Document

from rag_app.errors import TuneError
from rag_app.prompt import NOT_FOUND, build_messages

IGNORE = -100  # label of tokens without loss (prompt tokens)

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*>")
_HOTPOT = re.compile(r"\[PAR\]\s*\[TLE\]\s*(.*?)\s*\[SEP\]\s*")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{$])\s+")


@dataclass(frozen=True)
class Context:
    id: str
    name: str  # a plausible file name: the source the prompt shows
    text: str


@dataclass(frozen=True)
class Question:
    text: str
    context_id: str
    answer: str  # the shortest gold answer that occurs in the cleaned context


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]
    target: str
    gold: int | None  # the gold passage's number, None for a NOT_FOUND example


def clean_text(text: str) -> str:
    """Drop NQ's HTML markers and HotpotQA's [PAR] [TLE] ... [SEP] markers; undo the
    tokenised spacing (`2017 -- 18`, `word , word`)."""
    text = _HOTPOT.sub("\n", text)
    text = _TAG.sub(" ", text)
    text = text.replace(" -- ", " – ").replace("``", '"').replace("''", '"')
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return re.sub(r"[ \t]+", " ", re.sub(r"\s*\n\s*", "\n", text)).strip()


def _file_name(raw: dict[str, Any], text: str) -> str:
    """The title as a file name; untitled contexts get their first words (HotpotQA: the
    first paragraph's title)."""
    title = str(raw.get("title") or "")
    if not title and (m := _HOTPOT.search(str(raw.get("text", "")))):
        title = m.group(1)
    if not title:
        title = "-".join(re.findall(r"[A-Za-z0-9]+", text)[:4]).lower() or "document"
    return re.sub(r"[^\w.-]+", "_", title).strip("_")[:60] + ".txt"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise TuneError(f"{path}: training file not found (give the qa-pool folder)")
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuneError(f"{path}: not JSON lines ({e})") from e
    if not rows:
        raise TuneError(f"{path}: empty training file")
    return rows


def load_pool(folder: Path) -> tuple[list[Question], dict[str, Context]]:
    """questions.jsonl + contexts.jsonl, cleaned; questions whose answer is lost by the
    cleaning are dropped."""
    contexts: dict[str, Context] = {}
    for raw in _read_jsonl(folder / "contexts.jsonl"):
        text = clean_text(str(raw.get("text", "")))
        if text:
            contexts[str(raw["_id"])] = Context(str(raw["_id"]), _file_name(raw, text), text)
    questions = []
    for raw in _read_jsonl(folder / "questions.jsonl"):
        ctx = contexts.get(str(raw.get("context_id")))
        answers = sorted({clean_text(str(a)) for a in raw.get("answers", [])}, key=len)
        found = [a for a in answers if a and ctx is not None and a in ctx.text]
        if found and ctx is not None:
            questions.append(Question(str(raw["text"]).strip(), ctx.id, found[0]))
    if not questions:
        raise TuneError(f"{folder / 'questions.jsonl'}: no usable question (none has an answer "
                        "in its context)")
    return questions, contexts


def _digest(context_id: str) -> int:
    return int(hashlib.sha1(context_id.encode()).hexdigest(), 16)


def is_validation(context_id: str, share: int = 40) -> bool:
    """One context in `share` is held out (by hash: stable whatever the file order)."""
    return _digest(context_id) % share == 0


def window(text: str, rng: random.Random, words: int, answer: str | None = None) -> str:
    """About `words` words of `text`; with `answer`, a window that contains it."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    if len(spans) <= words:
        return text
    if answer is None:
        first = rng.randint(0, len(spans) - words)
        return text[spans[first][0]:spans[first + words - 1][1]]
    start = text.index(answer)
    end = start + len(answer)
    a0 = next(i for i, s in enumerate(spans) if s[1] > start)
    a1 = next(i for i in range(len(spans) - 1, -1, -1) if spans[i][0] < end)
    lo, hi = max(0, a1 - words + 1), min(a0, len(spans) - words)
    first = rng.randint(lo, hi) if lo <= hi else a0  # else: the answer is longer than words
    last = max(a1, first + words - 1)
    return text[spans[first][0]:spans[last][1]]


class ExampleSet:
    """Examples of one split, built on demand: `example(i)` depends only on (seed, i)."""

    def __init__(self, questions: list[Question], contexts: dict[str, Context], seed: int,
                 not_found: float = 0.2, words: tuple[int, int] = (60, 90),
                 distractors: tuple[int, int] = (2, 3)) -> None:
        self.contexts = contexts
        self.pool = sorted(contexts)  # distractors come from this split's contexts only
        self.questions = sorted(questions, key=lambda q: (q.context_id, q.text))
        random.Random(seed).shuffle(self.questions)
        self.seed, self.not_found, self.words = seed, not_found, words
        self.distractors = distractors
        if len(self.pool) < 4:
            raise TuneError(f"only {len(self.pool)} contexts: tuning needs at least 4")

    def __len__(self) -> int:
        return len(self.questions)

    def example(self, index: int, shrink: float = 1.0) -> Example:
        """The `index`-th example (cycling through the questions); `shrink` < 1 cuts the
        passages shorter (to fit a token budget)."""
        rng = random.Random(f"{self.seed}:{index}")
        q = self.questions[index % len(self.questions)]
        n_words = max(20, int(rng.randint(*self.words) * shrink))
        with_gold = rng.random() >= self.not_found
        docs = [self._distractor(rng, q, n_words) for _ in range(rng.randint(*self.distractors))]
        gold = None
        if with_gold:
            ctx = self.contexts[q.context_id]
            gold = rng.randint(0, len(docs))
            docs.insert(gold, Document(window(ctx.text, rng, n_words, q.answer),
                                       metadata={"source": ctx.name}))
        target = f"{q.answer} [{gold + 1}]" if gold is not None else NOT_FOUND
        return Example(build_messages(q.text, docs), target, None if gold is None else gold + 1)

    def _distractor(self, rng: random.Random, q: Question, n_words: int) -> Document:
        """A window of another context that does not contain the answer."""
        low = q.answer.lower()
        for _ in range(50):
            ctx = self.contexts[self.pool[rng.randrange(len(self.pool))]]
            text = window(ctx.text, rng, n_words)
            if ctx.id != q.context_id and low not in text.lower():
                return Document(text, metadata={"source": ctx.name})
        # A very common answer ("1", "a"): a passage without it as a word will do.
        word = re.compile(rf"\b{re.escape(low)}\b")
        for _ in range(200):
            ctx = self.contexts[self.pool[rng.randrange(len(self.pool))]]
            text = window(ctx.text, rng, n_words)
            if ctx.id != q.context_id and not word.search(text.lower()):
                return Document(text, metadata={"source": ctx.name})
        raise TuneError("cannot find passages without the answer: the training set is too "
                        "small or too repetitive")


def split(questions: list[Question], contexts: dict[str, Context], seed: int,
          val_examples: int, words: tuple[int, int] = (60, 90),
          distractors: tuple[int, int] = (2, 3)) -> tuple[ExampleSet, ExampleSet | None]:
    """Training and held-out validation sets, disjoint by context; the validation set asks
    one question a context."""
    val_ids = {c for c in contexts if is_validation(c)} if val_examples else set()
    if val_examples and len(val_ids) < 4:  # a small pool: its first 4 contexts by hash
        val_ids = set(sorted(contexts, key=_digest)[:4])
    train_q = [q for q in questions if q.context_id not in val_ids]
    firsts: dict[str, Question] = {}
    for q in questions:
        if q.context_id in val_ids:
            firsts.setdefault(q.context_id, q)
    val_q = sorted(firsts.values(), key=lambda q: q.context_id)[:val_examples]
    train = ExampleSet(train_q, {k: v for k, v in contexts.items() if k not in val_ids}, seed,
                       words=words, distractors=distractors)
    if not val_q:
        return train, None
    val = ExampleSet(val_q, {k: v for k, v in contexts.items() if k in val_ids}, seed + 1,
                     words=words, distractors=distractors)
    return train, val


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,): IGNORE on the prompt, the ids on the answer and its end


def encode(tokenizer: Any, example: Example) -> Encoded:
    """The chat template's prompt (system + user, then the assistant header) followed by the
    target and the template's end-of-turn token; loss on those answer tokens only."""
    prompt = tokenizer.apply_chat_template(example.messages, add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    answer = tokenizer(example.target + end_of_turn(tokenizer),
                       add_special_tokens=False)["input_ids"]
    ids = torch.tensor(list(prompt) + list(answer), dtype=torch.long)
    labels = ids.clone()
    labels[:len(prompt)] = IGNORE
    return Encoded(ids, labels)


def end_of_turn(tokenizer: Any) -> str:
    """The token the template closes an assistant turn with (SmolLM2: <|im_end|>)."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}],
        tokenize=False)
    after = probe.split("PROBE", 1)[1].strip()
    return after or str(tokenizer.eos_token)


def encode_fitting(tokenizer: Any, examples: ExampleSet, index: int,
                   max_tokens: int) -> Encoded:
    """`encode` of example `index`, its passages cut shorter until it fits `max_tokens`."""
    shrink = 1.0
    while True:
        enc = encode(tokenizer, examples.example(index, shrink))
        if len(enc.input_ids) <= max_tokens or shrink < 0.3:
            return enc
        shrink *= 0.8
