"""scoring.py: the paper's benchmark rules on hand-made items, one rule at a time, and the task-file formats."""
import json

import pytest

from scoring import (TaskError, choice_of, cut_generation, first_word, normalize, read_tasks, score, score_file,
                     task_rule)


# ---------------------------------------------------------------------------------------------------- text rules

@pytest.mark.parametrize("raw,cut", [
    ("Paris.\nQuestion: next", "Paris."),
    ("\n\n  Paris is big\nmore", "\n\n  Paris is big"),  # newlines before any word do not cut
    ("...\nParis", "...\nParis"),  # '...' has no word character: the first newline does not cut
    ("no newline at all", "no newline at all"),
])
def test_cut_at_first_newline_after_a_word(raw, cut):
    assert cut_generation(raw) == cut


@pytest.mark.parametrize("raw,norm", [
    ("Mairi's", "mairis"),  # punctuation is deleted, not replaced by a space
    ("  The Cat,   sat!  ", "the cat sat"),
    ("well-known", "wellknown"),
    ("\u201cQuoted\u201d", "quoted"),
    ("", ""),
])
def test_normalize_deletes_punctuation(raw, norm):
    assert normalize(raw) == norm


def test_first_word():
    assert first_word(" Romeo, my love") == "romeo" and first_word("!!") == ""


# ---------------------------------------------------------------------------------------------------- choices

CHOICES = ["a red apple", "the blue sea", "green grass", "a yellow sun"]


@pytest.mark.parametrize("gen,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("[c]", "C"),  # a bare letter names a choice
    ("The answer is C", "C"), ("answer: (d)", "D"),  # a letter after a keyword
    ("E", ""),  # past the last choice: not a choice
    ("the blue sea", "B"), ("The Blue Sea!", "B"),  # normalised equality
    ("The answer is green grass", "C"),  # equality once the prefix is removed
    ("I think the blue sea is right", "B"),  # exactly one choice contained
    ("a red apple or a yellow sun", ""),  # two choices contained: unmapped
    ("the blue seas", "B"),  # similarity >= 0.9
    ("something else entirely", ""),  # unmapped: no fallback to the first option
    ("", ""),
])
def test_choice_mapping(gen, letter):
    assert choice_of(gen, CHOICES) == letter


def test_unmapped_choice_is_wrong_not_option_a():
    task = {"ground_truth": "a red apple", "choices": CHOICES, "rule": "choice"}
    assert score("something else entirely", task) == 0.0
    assert score("A", task) == 1.0 and score("a red apple", task) == 1.0 and score("B", task) == 0.0


def test_choice_task_falls_back_to_equality_with_the_ground_truth():
    # ground truth that is not among the choices: only exact (normalised) equality counts
    task = {"ground_truth": "Purple rain", "choices": CHOICES, "rule": "choice"}
    assert score("purple rain!", task) == 1.0 and score("purple", task) == 0.0


# ---------------------------------------------------------------------------------------------------- one item per family

@pytest.mark.parametrize("name,task,right,wrong", [
    ("lambada", {"ground_truth": "Harry"}, " harry, said Ron\n", " Ron"),
    ("mmlu", {"ground_truth": "the blue sea", "choices": CHOICES}, " B\nQuestion:", " the red"),
    ("obqa", {"ground_truth": "green grass", "choices": CHOICES}, "Answer is C.", "D"),
    ("race", {"ground_truth": "a yellow sun", "choices": CHOICES}, " a yellow sun.", " a yellow"),
    ("siqa", {"ground_truth": "a red apple", "choices": CHOICES}, "(A)", "(B)"),
    ("hellaswag", {"ground_truth": "starts to toast and turn brown.", "choices": ["x y", "starts to toast and turn brown."]},
     " starts to toast and turn brown\nContext:", " B"),  # no letter mapping outside the four choice tasks
    ("squad", {"ground_truth": "Denver Broncos"}, " Denver Broncos.\n", " the Denver Broncos"),
    ("story_cloze", {"ground_truth": "She was happy.", "choices": ["She was happy.", "He left."]},
     " she was happy\n", " she was"),  # no nearest-option mapping
])
def test_each_task_family(name, task, right, wrong):
    task = {"choices": None, **task, "rule": task_rule(name)}
    assert score(right, task) == 1.0
    assert score(wrong, task) == 0.0


# ---------------------------------------------------------------------------------------------------- task files

def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def test_paper_format_prefix_and_rules_by_file_name(tmp_path):
    p = write(tmp_path, "mmlu.jsonl", [{"id": 7, "prompt": "Q: sky?\nAnswer:", "ground_truth": "the blue sea",
                                        "choices": CHOICES, "few_shot_prefix": "Q: grass?\nAnswer: green grass\n\n"}])
    name, tasks = read_tasks(p)
    assert name == "mmlu" and tasks[0]["rule"] == "choice" and tasks[0]["id"] == 7
    assert tasks[0]["prompt"] == "Q: grass?\nAnswer: green grass\n\nQ: sky?\nAnswer:"


def test_own_format_falls_back_to_the_line_scoring(tmp_path):
    p = write(tmp_path, "mine.jsonl", [{"prompt": "p", "answer": "Romeo", "scoring": "first_word"},
                                      {"prompt": "q", "answer": "yes", "options": ["yes", "no"]},
                                      {"prompt": "r", "answer": "Paris"}])
    _, tasks = read_tasks(p)
    assert [t["rule"] for t in tasks] == ["first_word", "choice", "exact"]


def test_score_file_prints_accuracy(tmp_path, capsys):
    import eval as ev
    p = write(tmp_path, "squad.jsonl", [{"id": 0, "prompt": "p", "ground_truth": "Denver", "generate": " Denver\n"},
                                       {"id": 1, "prompt": "p", "ground_truth": "Denver", "generate": " Boston"}])
    assert score_file(p) == {"task": "squad", "n": 2, "accuracy": 50.0}
    ev.main(["--score", p])
    assert json.loads(capsys.readouterr().out.strip()) == {"task": "squad", "n": 2, "accuracy": 50.0}
    # several files: one line each, then the paper's average (the mean of the task accuracies, not of items)
    p2 = write(tmp_path, "obqa.jsonl", [{"id": i, "prompt": "p", "ground_truth": "B", "choices": ["x", "y"],
                                         "generate": g} for i, g in enumerate(["B", "A", "A", "A"])])
    ev.main(["--score", p, p2])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [x["accuracy"] for x in lines] == [50.0, 25.0, 37.5] and lines[-1]["task"] == "average"
    missing = write(tmp_path, "lambada.jsonl", [{"prompt": "p", "ground_truth": "x"}])
    with pytest.raises(TaskError, match="no 'generate' field"):
        score_file(missing)


@pytest.mark.parametrize("bad,msg", [
    ('{"prompt": "p"', "not valid JSON"),
    ('["a"]', "must be a JSON object"),
    ('{"prompt": 3, "answer": "a"}', "'prompt' must be a string"),
    ('{"prompt": "p", "answer": "a", "scoring": "bleu"}', "'scoring' must be"),
    ('{"prompt": "p", "answer": "a", "options": ["a"]}', "at least 2 strings"),
    ('{"prompt": "p", "answer": "c", "options": ["a", "b"]}', "not one of the options"),
    ('{"prompt": "p", "answer": "a", "scoring": "option"}', "needs 'options'"),
])
def test_read_tasks_errors_name_the_line(tmp_path, bad, msg):
    p = write(tmp_path, "t.jsonl", ['{"prompt": "p", "answer": "a"}', bad])
    with pytest.raises(TaskError, match=f":2: .*{msg}"):
        read_tasks(p)
