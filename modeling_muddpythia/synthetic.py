"""A small synthetic language, its tokenizer and lm-evaluation-harness tasks built from it (all offline).

The language mixes five kinds of documents, each a line of space-separated words ending in "." (training text
separates documents with the end-of-text token, as Pythia's does; the few-shot prompts of the tasks join their
examples the same way):

* associative recall (multi-query associative recall, MQAR): ``recall k3 v17 k9 v2 ... ; k9 v2 k3 v17 .`` -
  key-value pairs, then queried keys each followed by its value. The values are only known from the context:
  this is the in-context skill the paper credits MUDD with improving.
* copy: ``copy F A Q = F A Q .`` (in-context, induction-style).
* stories: two or three named people pass an object around; the last word is a name that only the earlier
  sentences determine (the LAMBADA idea: the target needs the broad context).
* arithmetic facts: ``3 plus 4 is 7 .`` (memorised knowledge, the same in every document).
* counting: ``count 5 6 7 8 .``

Everything is generated from `random.Random(seed)`, so the corpus and the task files are reproducible
byte for byte. The tokenizer is word-level over the language's fixed vocabulary.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path


# --------------------------------------------------------------------------- vocabulary

END_OF_TEXT, PAD, UNKNOWN = "<|endoftext|>", "<pad>", "<unk>"
SPECIAL_TOKENS = (END_OF_TEXT, PAD, UNKNOWN)  # ids 0, 1, 2: bos = eos = 0 as in Pythia
KEYS = tuple(f"k{i}" for i in range(32))
VALUES = tuple(f"v{i}" for i in range(32))
SYMBOLS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")  # upper case: "a" is an English word here
MAX_NUMBER = 40
NUMBERS = tuple(str(i) for i in range(MAX_NUMBER + 1))
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")
OBJECTS = ("ball", "book", "apple", "cup", "key", "hat", "kite", "coin", "map", "shell")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "small", "big")
PLACES = ("park", "school", "garden", "market", "river", "house", "library", "beach")
WORDS = (
    "recall", ";", "copy", "=", "count", "plus", "is", ".", ",", "and", "went", "to", "the", "found", "a", "gave",
    "thanked", "later", "back", "met", "at", "showed", "asked", "for", "then", "took", "from", "with",
)
MAX_PAIRS = 8
ARITHMETIC_OPERANDS = range(0, 16)


def vocabulary() -> list[str]:
    """All words of the language, special tokens first; the order fixes the token ids."""
    words = [*SPECIAL_TOKENS, *WORDS, *NUMBERS, *SYMBOLS, *KEYS, *VALUES, *NAMES, *OBJECTS, *COLOURS, *PLACES]
    if len(set(words)) != len(words):
        raise AssertionError("the synthetic vocabulary has a repeated word")
    return words


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`: whitespace splits words, unknown words map to
    `<unk>`. Decoding writes a space before every word (as byte-level BPE tokenizers do), so that a continuation
    decoded on its own, as `pipeline` and `generate` users do, joins its prompt with a space: `" 9 ."`.
    bos = eos = `<|endoftext|>` (id 0), pad = `<pad>` (id 1)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Replace(Regex("^"), " ")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD, unk_token=UNKNOWN,
        model_max_length=1024,
    )


# --------------------------------------------------------------------------- documents


def _words(*parts) -> str:
    return " ".join(str(part) for part in parts)


def recall_example(rng: random.Random, num_pairs: int | None = None) -> dict:
    """Multi-query associative recall: distinct keys with random values, then the keys queried in random order.

    Returns `{"pairs": [[key, value], ...], "queries": [key, ...]}`; every key is queried once.
    """
    num_pairs = num_pairs or rng.randint(2, MAX_PAIRS)
    keys = rng.sample(KEYS, num_pairs)
    pairs = [[key, rng.choice(VALUES)] for key in keys]
    queries = [key for key, _ in pairs]
    rng.shuffle(queries)
    return {"pairs": pairs, "queries": queries}


def recall_text(example: dict, num_answered: int | None = None) -> str:
    """`recall k v ... ; k v ... .`; with `num_answered`, stop after that many answered queries and the next key."""
    values = dict(example["pairs"])
    head = _words("recall", *(word for pair in example["pairs"] for word in pair), ";")
    if num_answered is None:
        return _words(head, *(word for key in example["queries"] for word in (key, values[key])), ".")
    answered = example["queries"][:num_answered]
    return _words(head, *(word for key in answered for word in (key, values[key])), example["queries"][num_answered])


def copy_example(rng: random.Random) -> dict:
    return {"symbols": [rng.choice(SYMBOLS) for _ in range(rng.randint(2, 6))]}


def copy_text(example: dict) -> str:
    return _words("copy", *example["symbols"], "=", *example["symbols"], ".")


def count_example(rng: random.Random) -> dict:
    length = rng.randint(4, 8)
    return {"start": rng.randint(0, MAX_NUMBER - length + 1), "length": length}


def count_text(example: dict) -> str:
    return _words("count", *range(example["start"], example["start"] + example["length"]), ".")


def arithmetic_example(rng: random.Random) -> dict:
    return {"a": rng.choice(ARITHMETIC_OPERANDS), "b": rng.choice(ARITHMETIC_OPERANDS)}


def arithmetic_text(example: dict) -> str:
    return _words(example["a"], "plus", example["b"], "is", example["a"] + example["b"], ".")


# Sentences over people {A}, {B}, {C}, a place {P} and an object {O}; the last word names who gets the object
# back: whoever handed it to the last giver ({A} in most templates, {B} in the last one, whose first name is {A}).
_STORY_TEMPLATES = (
    ("{A} and {B} went to the {P} .", "{A} found a {O} .", "{A} gave the {O} to {B} .", "{B} thanked {A} .",
     "later {B} gave the {O} back to {A} ."),
    ("{B} met {A} at the {P} .", "{A} showed {B} a {O} .", "{B} asked {A} for the {O} .",
     "then {B} took the {O} from {A} ."),
    ("{A} went to the {P} with {B} and {C} .", "{A} found a {O} .", "{C} asked for the {O} .",
     "{A} gave the {O} to {B} .", "later {B} gave the {O} back to {A} ."),
    ("{A} , {B} and {C} went to the {P} .", "{A} found a {O} .", "{A} gave the {O} to {B} .",
     "{B} gave the {O} to {C} .", "later {C} gave the {O} back to {B} ."),
)


def story_example(rng: random.Random) -> dict:
    names = rng.sample(NAMES, 3)
    return {
        "template": rng.randrange(len(_STORY_TEMPLATES)),
        "A": names[0], "B": names[1], "C": names[2],
        "P": rng.choice(PLACES), "O": _words(rng.choice(COLOURS), rng.choice(OBJECTS)),
    }


def story_text(example: dict) -> str:
    fields = {key: example[key] for key in "ABCPO"}
    return _words(*(sentence.format(**fields) for sentence in _STORY_TEMPLATES[example["template"]]))


# kind -> (example generator, renderer, share of training documents)
DOCUMENT_KINDS: dict[str, tuple[Callable[[random.Random], dict], Callable[[dict], str], float]] = {
    "recall": (recall_example, recall_text, 0.35),
    "copy": (copy_example, copy_text, 0.20),
    "story": (story_example, story_text, 0.20),
    "arithmetic": (arithmetic_example, arithmetic_text, 0.15),
    "count": (count_example, count_text, 0.10),
}


def documents(seed: int) -> Iterator[str]:
    """An endless, reproducible stream of training documents mixed by `DOCUMENT_KINDS` shares."""
    rng = random.Random(seed)
    kinds = list(DOCUMENT_KINDS)
    shares = [DOCUMENT_KINDS[kind][2] for kind in kinds]
    while True:
        kind = rng.choices(kinds, shares)[0]
        make, render, _ = DOCUMENT_KINDS[kind]
        yield render(make(rng))


# --------------------------------------------------------------------------- lm-eval tasks

# Seeds far from the training seed, so evaluation documents are fresh draws (the arithmetic facts excepted: they
# are knowledge and the same everywhere).
TASK_SEED = 10_000
TASK_SIZES = {"train": 40, "test": 300}


def _recall_mc_row(rng: random.Random) -> dict:
    example = recall_example(rng, rng.randint(4, MAX_PAIRS))
    num_answered = rng.randrange(len(example["queries"]))
    values = dict(example["pairs"])
    answer = values[example["queries"][num_answered]]
    # distractors: other values of this very context, so that only the binding tells them apart
    others = sorted({value for value in values.values() if value != answer})
    choices = [answer, *rng.sample(others, min(3, len(others)))]
    rng.shuffle(choices)
    return {"context": recall_text(example, num_answered), "choices": choices, "label": choices.index(answer)}


def _arithmetic_mc_row(rng: random.Random) -> dict:
    example = arithmetic_example(rng)
    answer = example["a"] + example["b"]
    wrong = [n for n in range(max(0, answer - 3), min(MAX_NUMBER, answer + 3) + 1) if n != answer]
    choices = [str(n) for n in [answer, *rng.sample(wrong, 3)]]
    rng.shuffle(choices)
    context = _words(example["a"], "plus", example["b"], "is")
    return {"context": context, "choices": choices, "label": choices.index(str(answer))}


def _story_lastword_row(rng: random.Random) -> dict:
    text = story_text(story_example(rng))
    words = text.split(" ")[:-1]  # drop the final "."
    return {"context": _words(*words[:-1]), "target": words[-1]}


def _copy_generate_row(rng: random.Random) -> dict:
    symbols = copy_example(rng)["symbols"]
    return {"context": _words("copy", *symbols, "="), "target": _words(*symbols)}


def _perplexity_row(rng: random.Random) -> dict:
    return {"text": next(documents(rng.randrange(2**31)))}


# task name -> row generator; the YAML files in tests/tasks/ describe how lm-eval scores each.
TASK_ROWS: dict[str, Callable[[random.Random], dict]] = {
    "mudd_synth_recall": _recall_mc_row,  # multiple_choice, in-context
    "mudd_synth_arithmetic": _arithmetic_mc_row,  # multiple_choice, knowledge
    "mudd_synth_story": _story_lastword_row,  # loglikelihood, LAMBADA style
    "mudd_synth_copy": _copy_generate_row,  # generate_until, in-context
    "mudd_synth_perplexity": _perplexity_row,  # loglikelihood_rolling
}


def task_rows(task: str, split: str) -> list[dict]:
    """The documents of one split (`"train"`: few-shot pool, `"test"`: evaluated) of a synthetic task."""
    if task not in TASK_ROWS:
        raise KeyError(f"unknown synthetic task {task!r}; known: {sorted(TASK_ROWS)}")
    if split not in TASK_SIZES:
        raise KeyError(f"unknown split {split!r}; known: {sorted(TASK_SIZES)}")
    offset = sorted(TASK_ROWS).index(task) * 10 + sorted(TASK_SIZES).index(split)
    rng = random.Random(TASK_SEED + offset)
    return [TASK_ROWS[task](rng) for _ in range(TASK_SIZES[split])]


def write_task_data(folder: str | Path) -> list[Path]:
    """Write `<task>_<split>.jsonl` for every synthetic task into `folder`; returns the written paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in TASK_ROWS:
        for split in TASK_SIZES:
            path = folder / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in task_rows(task, split)))
            written.append(path)
    return written
