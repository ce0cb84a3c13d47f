"""The built-in task (arithmetic word problems), user data loading and evaluation.

Datasets use TRL's conversational prompt-completion format::

    {"prompt": [{"role": "user", "content": "..."}],
     "completion": [{"role": "assistant", "content": "12"}],
     "answer": "12"}
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ANSWER_INSTRUCTION = "Answer with just the number."
REQUIRED_COLUMNS = ("prompt", "completion")
ANSWER_COLUMN = "answer"
_EXPECTED_FORMAT = (
    "Expected columns 'prompt' and 'completion', either plain strings or "
    'conversational lists of messages ({"role": ..., "content": ...}), e.g. '
    '{"prompt": [{"role": "user", "content": "What is 2+3?"}], '
    '"completion": [{"role": "assistant", "content": "5"}], "answer": "5"}; '
    "evaluation also needs an 'answer' column (the expected final answer as a string)."
)

_NAMES = (
    "Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma",
    "Max", "Sara", "Jack", "Lily", "Omar", "Nina", "Paul", "Zoe",
)  # fmt: skip
_OBJECTS = (
    "apples", "pencils", "marbles", "cookies", "stickers", "books",
    "balloons", "cards", "shells", "coins", "stamps", "toy cars",
)  # fmt: skip

# Each template gets (name, object, a, b) and returns the question; the op is applied
# to (a, b). Subtraction templates only see a >= b, so every answer is >= 0.
_ADD_TEMPLATES: tuple[str, ...] = (
    "{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
    "{n} had {a} {o}. A friend gave {n} {b} more. How many {o} does {n} have now?",
    "There are {a} {o} in a box. {n} puts in {b} more. How many {o} are in the box now?",
    "{n} found {a} {o} on Monday and {b} more on Tuesday. How many {o} did {n} find?",
)
_SUB_TEMPLATES: tuple[str, ...] = (
    "{n} has {a} {o} and gives away {b}. How many {o} does {n} have left?",
    "{n} had {a} {o}. {n} lost {b} of them. How many {o} does {n} have now?",
    "There are {a} {o} in a box. {n} takes out {b}. How many {o} are left in the box?",
    "{n} bought {a} {o} and used {b} of them. How many {o} are left?",
)
_MIN_NUMBER = 1
_MAX_NUMBER = 20


def make_example(question: str, answer: str) -> dict[str, Any]:
    """Build one conversational prompt-completion example with an ``answer`` column."""
    return {
        "prompt": [{"role": "user", "content": f"{question} {ANSWER_INSTRUCTION}"}],
        "completion": [{"role": "assistant", "content": answer}],
        ANSWER_COLUMN: answer,
    }


def _random_problem(rng: random.Random) -> tuple[str, int]:
    """Draw one word problem and its integer answer."""
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    a = rng.randint(_MIN_NUMBER, _MAX_NUMBER)
    b = rng.randint(_MIN_NUMBER, _MAX_NUMBER)
    if rng.random() < 0.5:
        template, result = rng.choice(_ADD_TEMPLATES), a + b
    else:
        a, b = max(a, b), min(a, b)
        template, result = rng.choice(_SUB_TEMPLATES), a - b
    return template.format(n=name, o=obj, a=a, b=b), result


def arithmetic_problems(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Return ``n`` distinct ``(question, answer)`` pairs, deterministic for ``seed``.

    The sequence for a seed is fixed: asking for more problems only appends to it.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[tuple[str, str]] = []
    attempts, max_attempts = 0, 50 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"Could not generate {n} distinct arithmetic problems.")
        question, result = _random_problem(rng)
        if question not in seen:
            seen.add(question)
            problems.append((question, str(result)))
    return problems


#: The first ``EVAL_HEAD`` problems of a seed's sequence are reserved for evaluation; the train split follows them.
EVAL_HEAD = 100


def arithmetic_task(n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Return the built-in ``(train, eval)`` arithmetic word-problem datasets.

    Addition and subtraction of numbers 1-20 in several templates, names and objects,
    e.g. "Tom has 7 apples and buys 5 more. How many apples does Tom have now? Answer
    with just the number." -> "12". Problems are generated deterministically from
    ``seed`` and deduplicated. With ``p`` that sequence and ``H = EVAL_HEAD`` (100)::

        train = p[H : H + n_train]
        eval  = p[: min(n_eval, H)] + p[H + n_train : n_train + max(n_eval, H)]

    So the splits never share a problem, the train split never depends on ``n_eval`` (a run evaluated on 1,000
    problems trains on exactly the data of a run evaluated on 100), and up to ``H`` eval problems never depend on
    ``n_train``. Problems beyond the first ``H`` come after the train split.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError("n_train and n_eval must be >= 0")
    problems = arithmetic_problems(n_train + max(n_eval, EVAL_HEAD), seed=seed)
    train_problems = problems[EVAL_HEAD : EVAL_HEAD + n_train]
    eval_problems = problems[: min(n_eval, EVAL_HEAD)] + problems[EVAL_HEAD + n_train :]
    train_rows = [make_example(q, a) for q, a in train_problems]
    eval_rows = [make_example(q, a) for q, a in eval_problems]
    return _to_dataset(train_rows), _to_dataset(eval_rows)


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the right one shifted by 1 to 3 either way (never negative, never equal)."""
    value = int(answer)
    offsets = [d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
    return str(value + rng.choice(offsets))


def preference_task(n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The built-in task as preference pairs for DPO: ``chosen`` = the correct answer, ``rejected`` = a wrong one.

    Same problems and split as :func:`arithmetic_task` (so the eval split can be scored by exact match). Rows use
    TRL's conversational preference format: ``prompt`` (user turn), ``chosen`` and ``rejected`` (assistant turns),
    plus the ``answer`` column.
    """
    train, evaluation = arithmetic_task(n_train=n_train, n_eval=n_eval, seed=seed)
    rng = random.Random(seed + 1)

    def to_pair(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "prompt": row["prompt"],
            "chosen": row["completion"],
            "rejected": [{"role": "assistant", "content": wrong_answer(row[ANSWER_COLUMN], rng)}],
            ANSWER_COLUMN: row[ANSWER_COLUMN],
        }

    pairs = [to_pair(row) for row in train]
    return datasets.Dataset.from_list(pairs), evaluation


def _to_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    """Build a dataset from rows, keeping the columns even when there are no rows."""
    if rows:
        return datasets.Dataset.from_list(rows)
    message = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
    features = datasets.Features(
        {
            "prompt": message,
            "completion": message,
            ANSWER_COLUMN: datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict({"prompt": [], "completion": [], ANSWER_COLUMN: []}, features=features)


def load_dataset_any(path: str, require_answer: bool = False) -> datasets.Dataset:
    """Load user data from a local ``.jsonl`` file or a ``save_to_disk`` directory.

    Args:
        path: a JSON-lines file (one example per line) or a directory written by
            ``Dataset.save_to_disk`` (a ``DatasetDict`` must have a ``train`` split
            or exactly one split).
        require_answer: also require the ``answer`` column (needed for evaluation).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the data cannot be read or lacks the expected columns.
        TypeError: if a JSONL line is not a JSON object.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"Dataset path {path!r} does not exist. {_EXPECTED_FORMAT}")
    if source.is_dir():
        dataset = _load_from_disk(source)
    else:
        dataset = datasets.Dataset.from_list(_read_jsonl(source))
    validate_dataset(dataset, require_answer=require_answer, source=str(path))
    return dataset


def _load_from_disk(source: Path) -> datasets.Dataset:
    """Load a ``save_to_disk`` directory, picking one split of a ``DatasetDict``."""
    try:
        loaded = datasets.load_from_disk(str(source))
    except FileNotFoundError as err:
        raise ValueError(
            f"{str(source)!r} is a directory but not one written by datasets' save_to_disk: {err}"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise ValueError(f"{str(source)!r} holds splits {sorted(loaded)}; expected a 'train' split or a single split.")
    return loaded


def _read_jsonl(source: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file into a list of dicts, skipping blank lines."""
    rows: list[dict[str, Any]] = []
    with source.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source}:{line_no}: not valid JSON ({err.msg}).") from err
            if not isinstance(row, dict):
                raise TypeError(f"{source}:{line_no}: expected a JSON object per line.")
            rows.append(row)
    if not rows:
        raise ValueError(f"{source} has no examples. {_EXPECTED_FORMAT}")
    return rows


def validate_dataset(dataset: datasets.Dataset, require_answer: bool = False, source: str = "dataset") -> None:
    """Check that ``dataset`` has usable ``prompt``/``completion`` (and ``answer``) columns.

    Raises:
        ValueError: naming the missing or malformed columns and the expected format.
    """
    required = list(REQUIRED_COLUMNS) + ([ANSWER_COLUMN] if require_answer else [])
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{source} is missing column(s) {missing} (has {dataset.column_names}). {_EXPECTED_FORMAT}")
    if len(dataset) == 0:
        raise ValueError(f"{source} has no examples. {_EXPECTED_FORMAT}")
    first = dataset[0]
    for column in REQUIRED_COLUMNS:
        if not _is_text_or_messages(first[column]):
            raise ValueError(
                f"{source}: column {column!r} holds {type(first[column]).__name__}, not a "
                f"string or a list of messages. {_EXPECTED_FORMAT}"
            )


def _is_text_or_messages(value: Any) -> bool:
    """Return whether ``value`` is a string or a list of role/content messages."""
    if isinstance(value, str):
        return True
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def extract_number(text: str) -> str | None:
    """Return the first (optionally negative) integer in ``text``, normalised, or None."""
    match = re.search(r"-?\d+", text.replace(",", ""))
    return str(int(match.group())) if match else None


def _first_line(text: str) -> str:
    """Return ``text`` stripped and cut at its first newline."""
    return text.strip().split("\n", 1)[0].strip()


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str:
    """Render a prompt: chat template for messages, the raw string otherwise (as TRL)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def evaluate_exact_match(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset | Sequence[dict[str, Any]],
    batch_size: int = 32,
    max_new_tokens: int = 8,
    n_samples: int = 5,
) -> dict[str, Any]:
    """Greedy-generate an answer for each example and score it against ``answer``.

    Works for plain transformers models and PEFT-wrapped ones (uses ``model.generate``).
    Conversational prompts go through the tokenizer's chat template with
    ``add_generation_prompt=True``; plain-string prompts are used as they are. The
    model is put in eval mode for the run and every module's training flag is restored
    afterwards.

    Returns:
        ``{"exact_match", "number_match", "n", "samples"}``: ``exact_match`` is the
        fraction whose completion (stripped, up to its first newline) equals the answer;
        ``number_match`` the fraction whose first integer equals it; ``samples`` holds
        the first ``n_samples`` ``{"prompt", "completion", "answer"}`` dicts.
    """
    rows = list(dataset)
    if rows and ANSWER_COLUMN not in rows[0]:
        raise ValueError(f"Evaluation data has no {ANSWER_COLUMN!r} column. {_EXPECTED_FORMAT}")
    texts = [_prompt_text(tokenizer, row["prompt"]) for row in rows]
    answers = [str(row[ANSWER_COLUMN]).strip() for row in rows]
    # Chat-templated text already holds its special tokens; raw strings get them added,
    # as TRL does when it tokenizes plain-string prompts.
    add_special = bool(rows) and isinstance(rows[0]["prompt"], str)
    completions = _with_eval_mode(
        model,
        lambda: _generate(model, tokenizer, texts, batch_size, max_new_tokens, add_special),
    )
    exact = sum(_first_line(c) == a for c, a in zip(completions, answers, strict=True))
    numeric = sum(
        extract_number(c) is not None and extract_number(c) == extract_number(a)
        for c, a in zip(completions, answers, strict=True)
    )
    n = len(rows)
    return {
        "exact_match": exact / n if n else 0.0,
        "number_match": numeric / n if n else 0.0,
        "n": n,
        "samples": [
            {"prompt": t, "completion": c, "answer": a}
            for t, c, a in zip(texts[:n_samples], completions, answers, strict=False)
        ],
    }


def _with_eval_mode(model: torch.nn.Module, fn: Callable[[], list[str]]) -> list[str]:
    """Run ``fn`` with ``model`` in eval mode, restoring each module's mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        return fn()
    finally:
        for module, training in modes:
            module.training = training


def _generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int,
    max_new_tokens: int,
    add_special_tokens: bool,
) -> list[str]:
    """Greedy batched generation with left padding; returns decoded completions."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    pad_token = tokenizer.pad_token
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    # Similar lengths in a batch mean less padding; results go back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    completions = [""] * len(texts)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in indices],
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",
                    add_special_tokens=add_special_tokens,
                ).to(device)
                output = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_token_id,
                )
                new_tokens = output[:, batch["input_ids"].shape[1] :]
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text in zip(indices, decoded, strict=True):
                    completions[i] = text
    finally:
        if pad_token is None:
            tokenizer.pad_token = None
    return completions
