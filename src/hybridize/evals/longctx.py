"""Synthetic long-context tasks, generated offline: passkey retrieval and RULER-style needles in a haystack.

A sample is a prompt in the model's own tokenizer of at most `length` tokens (and within one filler word of it):
real filler text with needles inserted at a chosen depth, then a question, then the start of the answer ("The pass
key is"), so that a greedy continuation of a few tokens is the answer. Why synthetic: linear attention forgets what
softmax attention keeps, and retrieval at a known position and distance is the cleanest measure of that.

Variants (passkey: Mohtashami & Jaggi, arXiv 2305.16300; the others: RULER, arXiv 2404.06654):
  passkey     "The pass key is 71432. Remember it. 71432 is the pass key."; the 5-digit number is asked
  single      "One of the special magic numbers for {key} is: {value}."; the 7-digit value is asked by its key
  multikey    four such needles with different keys; one of them is asked
  multivalue  four values for one key; all of them are asked
  vartrack    a chain "VAR QWERT = 12345." "VAR ASDFG = VAR QWERT." ... (4 names); all names holding the value
              are asked

Depth d (percent of the filler's characters before the needle): the asked needle (passkey, single, multikey), the
first value (multivalue) or the chain's first assignment (vartrack) goes to the sentence boundary nearest d% (the
nearest word boundary when no sentence boundary lies within 2% of the filler or 200 characters); the other needles
to seeded random depths (vartrack: after the first, in chain order). The filler is a run of words ending at a
sentence end, cut at its start to fit the length. Every random choice of a sample
comes from random.Random("seed:variant:length:depth:trial"), so one seed gives the same prompts and answers on
every machine and in every process.

Prompt (plain, the default): "{instruction}\n\n{filler with needles}\n\nQuestion: {question}\nAnswer: {answer
start}", with the tokenizer's special tokens (BOS); chat: the same up to the question as a user turn of the
tokenizer's chat template, the answer's start opening the assistant turn. Plain is the default because it suits base
and instruct models alike: SmolLM2-135M-Instruct finds a pass key in 1k tokens of plain prompt and makes up an answer
in its chat template.

Scoring, exact match after this normalisation: the generated text is NFKC-normalised, stripped of leading
whitespace and cut at its first line break; answer items are taken from that line (numbers: runs of ASCII digits;
variable names: words of exactly five capital letters). One asked answer is right when the first item equals it;
all-asked answers when the set of items equals the set of answers (order and repeats free). So "71432." and
"71432 is the pass key" score, "7143", "714320", "71 432" or the answer on a second line do not.

The built-in filler is Henry David Thoreau's "Walden" (1854), from "Where I Lived, and What I Lived For" to
"Baker Farm": public domain, taken from Project Gutenberg eBook #205, paragraphs holding digits or verse dividers
removed (so no number in the filler can be mistaken for an answer), one paragraph a line.
"""

from __future__ import annotations

import bisect
import random
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import accumulate

from ..errors import HybridizeError

TASKS = {"passkey": ("passkey",), "niah": ("single", "multikey", "multivalue", "vartrack")}
VARIANTS = ("passkey", "single", "multikey", "multivalue", "vartrack")
BUILTIN_FILLER = "walden.txt"
BUILTIN_SOURCE = "built-in: H. D. Thoreau, Walden (1854), public domain"
MIN_FILLER_WORDS = 200  # a haystack must not repeat within a short prompt
NEEDLES_PER_SAMPLE = 4  # multikey, multivalue, and the vartrack chain length (RULER's defaults)

_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")
_ITEMS = {"number": re.compile(r"[0-9]+"), "name": re.compile(r"\b[A-Z]{5}\b")}

# RULER draws its keys from English word lists; these give 40 x 40 hyphenated keys such as "amber-lantern".
_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lively",
    "mellow", "narrow", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upper", "vivid", "wary", "young",
    "zealous", "bitter", "clever", "distant", "elegant", "fragile", "golden", "humble", "idle", "lucky", "modest",
    "noble", "polite", "rustic", "steady", "tender",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "teapot", "umbrella", "valley",
    "wagon", "yarrow", "zephyr", "bridge", "castle", "desert", "ember", "forest", "glacier", "hammer", "ivory",
    "jungle", "ladder", "mirror", "nectar", "oyster", "pillow", "rocket",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ filler


@dataclass(frozen=True)
class Filler:
    """Filler text as words (whitespace-split), with the indices of the words that start a sentence."""

    words: tuple[str, ...]
    sentence_starts: tuple[int, ...]  # ascending, starting with 0
    source: str


def filler_from_text(text: str, source: str) -> Filler:
    words = tuple(text.split())
    if len(words) < MIN_FILLER_WORDS:
        raise HybridizeError(f"the filler text ({source}) has {len(words)} words; long-context tasks need at least "
                             f"{MIN_FILLER_WORDS} (give --data with more text)")
    starts = [i for i in range(1, len(words)) if _SENTENCE_END.search(words[i - 1])]
    return Filler(words, (0, *starts), source)


def load_filler(paths: Sequence[str] | None = None) -> Filler:
    """The filler of --data (any text `distill` reads: text, JSONL, parquet, datasets folders), else the built-in."""
    if not paths:
        text = resources.files(__package__).joinpath("data", BUILTIN_FILLER).read_text(encoding="utf-8")
        return filler_from_text(text, BUILTIN_SOURCE)
    from ..train.data import iter_documents

    text = "\n".join(iter_documents(list(paths)))
    return filler_from_text(text, ", ".join(str(p) for p in paths))


# ------------------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class _Spec:
    """What one sample inserts and asks, before it is fitted to a length."""

    instruction: str
    needles: list[tuple[str, float]]  # (text, depth in [0, 1]), in the order they must appear at one boundary
    anchor: int  # index into needles of the one placed at the requested depth
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    kind: str  # "number" | "name"
    all_asked: bool


def _keys(rng: random.Random, k: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], k)
    return [f"{a}-{n}" for a, n in pairs]


def _numbers(rng: random.Random, k: int, digits: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


def _spec(variant: str, rng: random.Random, depth: float) -> _Spec:
    magic = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the numbers afterwards.")
    if variant == "passkey":
        (key,) = _numbers(rng, 1, 5)
        return _Spec(
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
            "you about the important information there.",
            [(f"The pass key is {key}. Remember it. {key} is the pass key.", depth)], 0,
            "What is the pass key?", "The pass key is", (key,), "number", False,
        )
    if variant in ("single", "multikey"):
        count = 1 if variant == "single" else NEEDLES_PER_SAMPLE
        keys, values = _keys(rng, count), _numbers(rng, count, 7)
        depths = [depth] + [rng.random() for _ in range(count - 1)]
        needles = [(f"One of the special magic numbers for {k} is: {v}.", d) for k, v, d in
                   zip(keys, values, depths, strict=True)]
        return _Spec(magic, needles, 0, f"What is the special magic number for {keys[0]} mentioned in the provided "
                     "text?", f"The special magic number for {keys[0]} mentioned in the provided text is",
                     (values[0],), "number", False)
    if variant == "multivalue":
        (key,), values = _keys(rng, 1), _numbers(rng, NEEDLES_PER_SAMPLE, 7)
        depths = [depth] + [rng.random() for _ in range(len(values) - 1)]
        needles = [(f"One of the special magic numbers for {key} is: {v}.", d) for v, d in
                   zip(values, depths, strict=True)]
        return _Spec(magic, needles, 0, f"What are all the special magic numbers for {key} mentioned in the "
                     "provided text?", f"The special magic numbers for {key} mentioned in the provided text are",
                     tuple(values), "number", True)
    if variant == "vartrack":
        names: list[str] = []
        while len(names) < NEEDLES_PER_SAMPLE:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        (value,) = _numbers(rng, 1, 5)
        depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in names[1:])
        needles = [(f"VAR {names[0]} = {value}.", depths[0])]
        needles += [(f"VAR {b} = VAR {a}.", d) for a, b, d in zip(names[:-1], names[1:], depths[1:], strict=True)]
        return _Spec(
            "Memorize and track the chain of variable assignments hidden in the following text.", needles, 0,
            f"Find all variables that are assigned the value {value} in the text above.",
            f"According to the chain of variable assignments in the text above, {len(names)} variables are "
            f"assigned the value {value}, they are:", tuple(names), "name", True,
        )
    raise HybridizeError(f"unknown long-context task variant {variant!r}; choose from {', '.join(VARIANTS)}")


@dataclass(frozen=True)
class Sample:
    """One prompt and its answers. Char spans index `prompt`; `input_ids` is `prompt` in the model's tokenizer."""

    variant: str
    length: int  # requested tokens
    depth: int  # requested depth, percent
    trial: int
    prompt: str
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    kind: str
    all_asked: bool
    needles: tuple[tuple[int, int], ...]  # every needle's span
    anchor: int  # index into needles of the one placed at the requested depth
    context: tuple[int, int]  # the span of the filler with its needles
    max_new_tokens: int


def sample_rng(seed: int, variant: str, length: int, depth: int, trial: int) -> random.Random:
    """The one random source of a sample (string seeds hash with SHA-512: stable across processes)."""
    return random.Random(f"{seed}:{variant}:{length}:{depth}:{trial}")


class TaskBuilder:
    """Builds samples for one tokenizer and filler; `chat` wraps the prompt in the tokenizer's chat template."""

    def __init__(self, tokenizer, filler: Filler, chat: bool, seed: int = 0):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise HybridizeError("--prompt chat: this tokenizer has no chat template; use --prompt plain")
        self.tokenizer, self.filler, self.chat, self.seed = tokenizer, filler, chat, seed
        self._starts = frozenset(filler.sentence_starts)
        probe = filler.words[:4000]
        self.tokens_per_word = max(len(self._encode(" ".join(probe), False)) / len(probe), 0.5)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _render(self, spec: _Spec, context: str) -> tuple[str, int]:
        """The prompt text and where `context` starts in it."""
        user = f"{spec.instruction}\n\n{context}\n\nQuestion: {spec.question}"
        if self.chat:
            head = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
            text = f"{head}{spec.answer_prefix}"
        else:
            text = f"{user}\nAnswer: {spec.answer_prefix}"
        start = text.find(context)
        if start < 0:
            raise HybridizeError("the chat template changed the prompt's text; use --prompt plain")
        return text, start

    def _context(self, spec: _Spec, end: int, m: int) -> tuple[str, list[tuple[int, int]]]:
        """The m filler words before word `end` (a sentence start; cycling) with the needles inserted at sentence
        boundaries, and the needles' char spans in it. Ending at `end`, the filler closes with a whole sentence, and
        a needle at depth 100 follows it rather than a cut one; the cut falls at the start, before depth 0."""
        n = len(self.filler.words)
        idx = [(end - m + j) % n for j in range(m)]
        words = [self.filler.words[i] for i in idx]
        offsets = list(accumulate((len(w) + 1 for w in words), initial=0))  # char start of word j in " ".join
        total = max(offsets[-1] - 1, 0)
        bounds = [j for j in range(m) if idx[j] in self._starts] + [m]
        points = [self._nearest(bounds, m, offsets, depth * total, total) for _, depth in spec.needles]
        pieces: list[str] = []
        where: dict[int, int] = {}  # needle -> its index in pieces
        cursor = 0
        for i in sorted(range(len(spec.needles)), key=lambda i: (points[i], i)):
            pieces.extend(words[cursor : points[i]])
            cursor = points[i]
            where[i] = len(pieces)
            pieces.append(spec.needles[i][0])
        pieces.extend(words[cursor:])
        starts = list(accumulate((len(p) + 1 for p in pieces), initial=0))
        spans = [(starts[where[i]], starts[where[i]] + len(text)) for i, (text, _) in enumerate(spec.needles)]
        return " ".join(pieces), spans

    @staticmethod
    def _nearest(bounds: list[int], m: int, offsets: list[int], target: float, total: int) -> int:
        """The sentence boundary nearest `target` chars; the nearest word boundary when no sentence ends near it
        (filler without punctuation must not move the needle away from its depth)."""

        def closest(candidates: Sequence[int]) -> int:
            chars = [min(offsets[j], total) for j in candidates]
            k = bisect.bisect_left(chars, target)
            return min((c for c in (k - 1, k) if 0 <= c < len(candidates)), key=lambda c: abs(chars[c] - target))

        j = bounds[closest(bounds)]
        if abs(min(offsets[j], total) - target) > max(200, 0.02 * total):
            j = closest(range(m + 1))
        return j

    def sample(self, variant: str, length: int, depth: int, trial: int) -> Sample:
        """The sample of (variant, length, depth %, trial): at most `length` tokens, the most filler that fits."""
        rng = sample_rng(self.seed, variant, length, depth, trial)
        spec = _spec(variant, rng, depth / 100)
        end = rng.choice(self.filler.sentence_starts)

        def build(m: int):
            context, spans = self._context(spec, end, m)
            text, at = self._render(spec, context)
            return len(self._encode(text, not self.chat)), (text, at, context, spans)

        # The largest m (filler words) whose prompt fits: steps from the measured tokens per word, then regula falsi
        # inside the bracket [lo fits, hi does not]. Each step moves lo or hi, so it ends (a few tokenizations).
        base, built = build(0)
        if base > length:
            raise HybridizeError(f"a {variant} prompt needs {base} tokens before any filler; length {length} is too "
                                 "short (use longer --lengths)")
        lo, lo_tokens, hi, hi_tokens = 0, base, None, None
        while lo_tokens < length and (hi is None or hi - lo > 1):
            if hi is None:
                rate = (lo_tokens - base) / lo if lo else self.tokens_per_word
                guess = lo + max(1, int((length - lo_tokens) / max(rate, 0.1)))
            else:
                guess = lo + int((length - lo_tokens) * (hi - lo) / (hi_tokens - lo_tokens))
                guess = min(max(guess, lo + 1), hi - 1)
            tokens, candidate = build(guess)
            if tokens <= length:
                lo, lo_tokens, built = guess, tokens, candidate
            else:
                hi, hi_tokens = guess, tokens
        text, at, context, spans = built
        ids = self._encode(text, not self.chat)
        answer_tokens = len(self._encode(" " + ", ".join(spec.answers) + ".", False))
        return Sample(variant, length, depth, trial, text, tuple(ids), spec.answers, spec.kind, spec.all_asked,
                      tuple((at + a, at + b) for a, b in spans), spec.anchor, (at, at + len(context)),
                      answer_tokens + answer_tokens // 2 + 8)


def make_samples(builder: TaskBuilder, variants: Sequence[str], lengths: Sequence[int], depths: Sequence[int],
                 trials: int, progress: bool = False) -> list[Sample]:
    """Every (variant, length, depth, trial) sample, in that nesting order."""
    from tqdm.auto import tqdm

    cells = [(v, n, d, t) for v in variants for n in lengths for d in depths for t in range(trials)]
    return [builder.sample(*cell) for cell in tqdm(cells, desc="prompts", unit="prompt", disable=not progress)]


# ----------------------------------------------------------------------------------------------------------- scoring


def normalize_output(text: str) -> str:
    """NFKC, leading whitespace stripped, cut at the first line break: the line that should hold the answer."""
    return unicodedata.normalize("NFKC", text).lstrip().split("\n", 1)[0]


def extract_items(text: str, kind: str) -> list[str]:
    """Answer items of `kind` ("number" or "name") in the normalised output, in order."""
    return _ITEMS[kind].findall(normalize_output(text))


def is_correct(output: str, answers: Sequence[str], kind: str, all_asked: bool) -> bool:
    """Exact match (see the module docstring): first item for one answer, the item set for all-asked answers."""
    items = extract_items(output, kind)
    if all_asked:
        return set(items) == set(answers)
    return bool(items) and len(answers) == 1 and items[0] == answers[0]
