"""Tests for the built-in arithmetic task, user data loading and exact-match evaluation."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch
from helpers_tasks import tiny_chat_model, tiny_chat_tokenizer

from sparse_peft.tasks import (
    ANSWER_INSTRUCTION,
    arithmetic_problems,
    arithmetic_task,
    evaluate_exact_match,
    extract_number,
    load_dataset_any,
)

_NUMBER = re.compile(r"\d+")


def _question(row: dict) -> str:
    return row["prompt"][0]["content"]


def test_arithmetic_task_is_deterministic_for_a_seed() -> None:
    train_a, eval_a = arithmetic_task(n_train=200, n_eval=50, seed=3)
    train_b, eval_b = arithmetic_task(n_train=200, n_eval=50, seed=3)
    assert train_a.to_list() == train_b.to_list()
    assert eval_a.to_list() == eval_b.to_list()
    train_c, _ = arithmetic_task(n_train=200, n_eval=50, seed=4)
    assert train_c.to_list() != train_a.to_list()


def test_eval_split_does_not_depend_on_train_size() -> None:
    _, small = arithmetic_task(n_train=10, n_eval=40)
    _, large = arithmetic_task(n_train=500, n_eval=40)
    assert small.to_list() == large.to_list()


def test_train_split_does_not_depend_on_eval_size() -> None:
    """More eval problems (less noise in a score) must not change what a run trains on."""
    problems = arithmetic_problems(2600, seed=0)
    train_100, eval_100 = arithmetic_task(n_train=2000, n_eval=100)
    train_600, eval_600 = arithmetic_task(n_train=2000, n_eval=600)
    train_0, eval_0 = arithmetic_task(n_train=2000, n_eval=0)
    assert train_100.to_list() == train_600.to_list() == train_0.to_list()
    assert [_question(row) for row in train_100] == [f"{q} {ANSWER_INSTRUCTION}" for q, _ in problems[100:2100]]
    assert len(eval_600) == 600 and len(eval_0) == 0
    assert eval_600.to_list()[:100] == eval_100.to_list()
    assert [_question(row) for row in eval_600][100:] == [f"{q} {ANSWER_INSTRUCTION}" for q, _ in problems[2100:2600]]
    assert not {_question(row) for row in eval_600} & {_question(row) for row in train_600}


def test_train_and_eval_share_no_problem_and_have_no_duplicates() -> None:
    train, evaluation = arithmetic_task(n_train=2000, n_eval=100)
    assert len(train) == 2000
    assert len(evaluation) == 100
    train_questions = [_question(row) for row in train]
    eval_questions = [_question(row) for row in evaluation]
    assert len(set(train_questions)) == len(train_questions)
    assert len(set(eval_questions)) == len(eval_questions)
    assert not set(train_questions) & set(eval_questions)


def test_answers_are_correct_integers() -> None:
    problems = arithmetic_problems(500, seed=1)
    n_add = 0
    for question, answer in problems:
        a, b = (int(x) for x in _NUMBER.findall(question))
        assert answer == str(int(answer))
        assert int(answer) in (a + b, a - b)
        if int(answer) == a + b and int(answer) != a - b:
            n_add += 1
        assert int(answer) >= 0
    assert 100 < n_add < 400, "both addition and subtraction should be common"


def test_answers_follow_the_operation_in_the_wording() -> None:
    for question, answer in arithmetic_problems(300, seed=2):
        a, b = (int(x) for x in _NUMBER.findall(question))
        subtract = any(word in question for word in ("gives away", "lost", "takes out", "used"))
        assert int(answer) == (a - b if subtract else a + b), question


def test_format_is_trl_conversational_prompt_completion() -> None:
    train, evaluation = arithmetic_task(n_train=5, n_eval=5)
    for dataset in (train, evaluation):
        assert set(dataset.column_names) == {"prompt", "completion", "answer"}
        for row in dataset:
            assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
            assert row["prompt"][0]["content"].endswith(ANSWER_INSTRUCTION)
            assert row["completion"] == [{"role": "assistant", "content": row["answer"]}]
            assert isinstance(row["answer"], str)
    from trl.data_utils import is_conversational  # TRL's own check of the format SFTTrainer reads

    assert is_conversational(train[0])


def test_empty_splits_keep_their_columns() -> None:
    train, evaluation = arithmetic_task(n_train=0, n_eval=3)
    assert len(train) == 0
    assert set(train.column_names) == {"prompt", "completion", "answer"}
    assert len(evaluation) == 3


def test_extract_number() -> None:
    assert extract_number(" 12 apples") == "12"
    assert extract_number("He has -3 left, then 5") == "-3"
    assert extract_number("1,000") == "1000"
    assert extract_number("007") == "7"
    assert extract_number("none") is None


# ---------------------------------------------------------------- loading user data


def _write_jsonl(path, rows) -> None:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")


def test_load_jsonl_conversational(tmp_path) -> None:
    _, evaluation = arithmetic_task(n_train=0, n_eval=4)
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, evaluation.to_list())
    loaded = load_dataset_any(str(path), require_answer=True)
    assert loaded.to_list() == evaluation.to_list()


def test_load_jsonl_plain_strings_and_blank_lines(tmp_path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text(
        '{"prompt": "2+3=", "completion": "5", "answer": "5"}\n\n'
        '{"prompt": "4+4=", "completion": "8", "answer": "8"}\n',
        encoding="utf-8",
    )
    loaded = load_dataset_any(str(path))
    assert loaded["prompt"] == ["2+3=", "4+4="]


def test_load_from_disk_dataset_and_dataset_dict(tmp_path) -> None:
    train, evaluation = arithmetic_task(n_train=6, n_eval=3)
    train.save_to_disk(str(tmp_path / "single"))
    assert load_dataset_any(str(tmp_path / "single")).to_list() == train.to_list()
    datasets.DatasetDict({"train": train, "test": evaluation}).save_to_disk(str(tmp_path / "dict"))
    assert load_dataset_any(str(tmp_path / "dict")).to_list() == train.to_list()


def test_missing_columns_give_a_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"question": "2+3?", "response": "5"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'completion'\]") as err:
        load_dataset_any(str(path))
    assert "answer" in str(err.value)  # the message describes the whole expected format

    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]).save_to_disk(str(tmp_path / "no_answer"))
    load_dataset_any(str(tmp_path / "no_answer"))  # fine for training
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
        load_dataset_any(str(tmp_path / "no_answer"), require_answer=True)


def test_malformed_data_gives_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_any(str(tmp_path / "nope.jsonl"))
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_json.jsonl:2: not valid JSON"):
        load_dataset_any(str(bad_json))
    bad_type = tmp_path / "bad_type.jsonl"
    _write_jsonl(bad_type, [{"prompt": 3, "completion": "b"}])
    with pytest.raises(ValueError, match="column 'prompt' holds int"):
        load_dataset_any(str(bad_type))
    not_a_dataset = tmp_path / "plain_dir"
    not_a_dataset.mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_dataset_any(str(not_a_dataset))


# ---------------------------------------------------------------- evaluation


def test_evaluate_exact_match_runs_and_restores_training_mode() -> None:
    model, tokenizer = tiny_chat_model(), tiny_chat_tokenizer()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly as it was
    _, evaluation = arithmetic_task(n_train=0, n_eval=7)
    result = evaluate_exact_match(model, tokenizer, evaluation, batch_size=3, max_new_tokens=4)
    assert set(result) == {"exact_match", "number_match", "n", "samples"}
    assert result["n"] == 7
    assert 0.0 <= result["exact_match"] <= result["number_match"] <= 1.0
    assert len(result["samples"]) == 5
    sample = result["samples"][0]
    assert set(sample) == {"prompt", "completion", "answer"}
    assert sample["prompt"].endswith("<assistant>")
    assert sample["answer"] == evaluation[0]["answer"]
    assert model.training and not model.model.layers[0].training
    assert model.lm_head.training


class _EchoAnswer(torch.nn.Module):
    """Wraps the tiny model so that ``generate`` emits a chosen text after the prompt."""

    def __init__(self, tokenizer, replies: dict[str, str]) -> None:
        super().__init__()
        self.inner = tiny_chat_model()
        self.generation_config = self.inner.generation_config
        self.tokenizer, self.replies = tokenizer, replies
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"training": self.training, "mask": attention_mask, **kwargs})
        assert not torch.is_grad_enabled()
        rows = []
        for ids in input_ids:
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            reply = next(r for key, r in self.replies.items() if key in prompt)
            reply_ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
            rows.append(ids.tolist() + reply_ids + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def test_evaluate_scoring_and_left_padding() -> None:
    tokenizer = tiny_chat_tokenizer()
    rows = [
        {"prompt": [{"role": "user", "content": "q1"}], "answer": "12"},
        {"prompt": [{"role": "user", "content": "q2 a much longer prompt"}], "answer": "7"},
        {"prompt": [{"role": "user", "content": "q3"}], "answer": "5"},
        {"prompt": [{"role": "user", "content": "q4"}], "answer": 9},
    ]
    replies = {"q1": " 12\nmore", "q2": "It is 7.", "q3": "6", "q4": "9"}
    model = _EchoAnswer(tokenizer, replies)
    result = evaluate_exact_match(model, tokenizer, rows, batch_size=2)
    assert result["n"] == 4
    assert result["exact_match"] == pytest.approx(2 / 4)  # q1 (first line) and q4
    assert result["number_match"] == pytest.approx(3 / 4)  # q1, q2, q4
    assert [s["completion"] for s in result["samples"]] == [replies[f"q{i}"] for i in range(1, 5)]
    assert all(not call["training"] for call in model.calls)
    assert all(call["do_sample"] is False for call in model.calls)
    for call in model.calls:  # left padding: every row ends with a real token
        assert bool(call["mask"][:, -1].all())
    assert model.training  # restored


def test_evaluate_works_without_pad_token_and_on_a_peft_model() -> None:
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_chat_tokenizer(pad=False)
    peft_model = get_peft_model(tiny_chat_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    _, evaluation = arithmetic_task(n_train=0, n_eval=3)
    result = evaluate_exact_match(peft_model, tokenizer, evaluation, max_new_tokens=2)
    assert result["n"] == 3
    assert tokenizer.pad_token is None  # not changed behind the caller's back
    assert peft_model.training


def test_evaluate_plain_string_prompts_and_empty_data() -> None:
    model, tokenizer = tiny_chat_model(), tiny_chat_tokenizer(chat_template=None)
    rows = [{"prompt": "2+3=", "answer": "5"}]
    result = evaluate_exact_match(model, tokenizer, rows, max_new_tokens=2)
    assert result["samples"][0]["prompt"] == "2+3="
    empty = evaluate_exact_match(model, tokenizer, [], max_new_tokens=2)
    assert empty == {"exact_match": 0.0, "number_match": 0.0, "n": 0, "samples": []}
    with pytest.raises(ValueError, match="'answer'"):
        evaluate_exact_match(model, tokenizer, [{"prompt": "x"}])
