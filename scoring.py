"""How generations are scored (pure functions): task answers by the rules of the paper's benchmark evaluation
(docs/method.md §9, the release's scripts/acc_calc.py): cut at the first newline after a word character, normalised;
lambada compares first words, mmlu, obqa, race and siqa map the answer to a choice letter (choice_of), every other
task needs equality. Task files: the paper's JSONL format or this repo's (read_tasks). Free samples: judge-free
n-gram metrics (ngram_metrics). Testbed lines: balanced brackets (open_brackets, score_completion)."""
import difflib
import functools
import json
import math
import os
import re
from collections import Counter

import numpy as np

from cli import json_loads

PAPER_TASKS = ("lambada", "mmlu", "obqa", "hellaswag", "race", "siqa", "squad", "story_cloze")
CHOICE_TASKS = ("mmlu", "obqa", "race", "siqa")
RULE_OF_SCORING = {"first_word": "first_word", "option": "choice", "exact": "exact"}


class TaskError(ValueError):
    """A bad task file; the message is one line meant for the user."""


def cut_generation(text):
    """Everything before the first newline that has a word character in front of it."""
    m = re.search(r"\w[^\n]*", text)
    return text[:m.end()] if m else text


def normalize(text):
    """Lower-case, strip, delete punctuation (anything neither word character nor space), collapse spaces."""
    return " ".join(re.sub(r"[^\w\s]", "", str(text or "").lower()).split())


def similarity(a, b, floor=0.0):
    """difflib ratio of the normalised texts (both empty: 1.0); 0.0 where difflib's linear bounds are below floor."""
    m = difflib.SequenceMatcher(None, normalize(a), normalize(b))
    return m.ratio() if m.real_quick_ratio() >= floor and m.quick_ratio() >= floor else 0.0


def first_word(text):
    return (normalize(text).split() or [""])[0]


_ANSWER_LINE = re.compile(r"(?i)\b(?:final\s+answer|answer)\b\s*(?:is|=|:|：)?\s*(.+)$")
_BARE_LETTER = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\.?")
_KEYWORD_LETTER = re.compile(r"(?i)\b(?:final\s+answer|answer|option|choice)\b\s*(?:is|=|:|：)?\s*"
                             r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?=\s|$|[.,;:!?])")
_BRACKET_LETTER = re.compile(r"[\(\[]\s*([A-Za-z])\s*[\)\]]")
_ANSWER_PREFIX = re.compile(r"(?i)^(the\s+)?(correct\s+)?(final\s+)?(answer|option|choice)\b\s*(is|=|:|：)?\s*")


def letter_in(text, n_choices):
    """A choice letter written as such: bare, after a keyword, or bracketed in a short reply; '' if none (a letter
    past the last choice does not count: the next form is tried)."""
    raw = str(text or "").strip()
    m = _BARE_LETTER.fullmatch(raw)
    candidates = ([m.group(1)] if m else []) + _KEYWORD_LETTER.findall(raw)[-1:]
    candidates += _BRACKET_LETTER.findall(raw)[-1:] if len(raw) <= 40 else []
    return next((c.upper() for c in candidates if 0 <= ord(c.upper()) - 65 < n_choices), "")


def choice_by_text(text, choices):
    """The letter of the choice the text names by its words; '' if none or several."""
    if not choices:
        return ""
    norm_choices = [normalize(c) for c in choices]
    cleaned = _ANSWER_PREFIX.sub("", str(text)).strip()
    for norm in (normalize(text), normalize(cleaned)):  # as written, then without an "answer is" prefix
        if not norm:
            return ""
        if norm in norm_choices:
            return chr(65 + norm_choices.index(norm))
    inside = [i for i, c in enumerate(norm_choices) if c and c in norm]
    if len(inside) == 1:
        return chr(65 + inside[0])
    scores = [similarity(cleaned, c, 0.9) for c in choices]
    best = max(range(len(choices)), key=lambda i: (scores[i], -i))
    return chr(65 + best) if scores[best] >= 0.9 else ""


def choice_of(text, choices):
    """The choice letter a generation maps to, or '' (unmapped): a letter written as such (letter_in), else the
    choice its words name (choice_by_text); the last "answer is ..." line is tried before the whole reply."""
    found = [m for m in map(_ANSWER_LINE.search, map(str.strip, str(text or "").splitlines())) if m]
    seg, n = found[-1].group(1) if found else str(text or "").strip(), min(len(choices), 26)  # after "answer (is)"
    return letter_in(seg, n) or choice_by_text(seg, choices) or letter_in(text, n) or choice_by_text(text, choices)


def score(generation, task):
    """1.0 if the generation answers the task by its rule, else 0.0."""
    gen, truth, rule = cut_generation(generation), task["ground_truth"], task["rule"]
    if rule == "first_word":
        return float(first_word(gen) == first_word(truth))
    if rule == "choice":
        choices = task.get("choices") or []
        predicted = choice_of(gen, choices)
        if predicted and predicted == (letter_in(truth, min(len(choices), 26)) or choice_by_text(truth, choices)):
            return 1.0
    return float(normalize(gen) == normalize(truth))  # similarity 1.0, in linear time


def task_rule(name, scoring=None):
    """The rule of a task by its name (file-name stem), else by the line's own `scoring`."""
    if name in PAPER_TASKS:
        return "first_word" if name == "lambada" else "choice" if name in CHOICE_TASKS else "exact"
    return RULE_OF_SCORING.get(scoring or "exact", "exact")


def parse_task(obj, name, where, index):
    """One task {id, prompt, ground_truth, choices, rule, [generate]} from the paper's format (few_shot_prefix put
    before the prompt; no id: its index) or this repo's (prompt, answer, options, scoring); TaskError names where."""
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: each line must be a JSON object")
    truth_key, prefix = "ground_truth" if "ground_truth" in obj else "answer", obj.get("few_shot_prefix") or ""
    for key, value in (("prompt", obj.get("prompt")), (truth_key, obj.get(truth_key)), ("few_shot_prefix", prefix)):
        if not isinstance(value, str):
            raise TaskError(f"{where}: '{key}' must be a string")
    choices = obj.get("choices", obj.get("options"))
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) for c in choices)):
        raise TaskError(f"{where}: 'choices' / 'options' must be a list of at least 2 strings")
    scoring = obj.get("scoring", "option" if choices and name not in PAPER_TASKS else "exact")
    if not isinstance(scoring, str) or scoring not in RULE_OF_SCORING:
        raise TaskError(f"{where}: 'scoring' must be first_word, option or exact, got {scoring!r}")
    rule = task_rule(name, scoring)
    if rule == "choice" and name not in PAPER_TASKS:
        if choices is None:
            raise TaskError(f"{where}: scoring 'option' needs 'options'")
        if obj[truth_key].strip() not in [c.strip() for c in choices]:
            raise TaskError(f"{where}: 'answer' is not one of the options")
    return {"id": index if obj.get("id") is None else obj["id"], "prompt": prefix + obj["prompt"],
            "ground_truth": obj[truth_key], "choices": choices, "rule": rule,
            **({"generate": str(obj["generate"])} if "generate" in obj else {})}


def read_tasks(path):
    """Parse and check a JSONL task file -> (task name, [task]); a bad line raises TaskError with its number."""
    name, tasks = os.path.splitext(os.path.basename(path))[0], []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except UnicodeDecodeError as e:
        raise TaskError(f"task file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise TaskError(f"task file {path} cannot be read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json_loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        tasks.append(parse_task(obj, name, f"{path}:{n}", len(tasks)))
    if not tasks:
        raise TaskError(f"task file {path} holds no task")
    return name, tasks


def score_file(path):
    """Score the existing generations ('generate' field) of a task file -> {task, n, accuracy (percent)}."""
    name, tasks = read_tasks(path)
    if missing := sum("generate" not in t for t in tasks):
        raise TaskError(f"{path}: {missing} of {len(tasks)} lines have no 'generate' field to score")
    return {"task": name, "n": len(tasks), "accuracy": 100.0 * sum(score(t["generate"], t) for t in tasks) / len(tasks)}


def grams(s, n):
    """The n-grams of one token list, as tuples."""
    return [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]


class TrainNgrams:
    """Membership of token 2- and 3-grams in the training split (sorted int64 codes, searchsorted)."""

    @classmethod
    def of(cls, data, limit=50_000_000):
        """The n-grams of a prepared dataset's training split (its first `limit` tokens)."""
        return cls(data.tokens("train", limit=limit), data.meta["vocab_size"])

    def __init__(self, train_tokens, vocab_size):
        ids, self.V = np.asarray(train_tokens, dtype=np.int64), vocab_size
        self.codes = {n: np.unique(self.code([ids[j:len(ids) - n + 1 + j] for j in range(n)])) for n in (2, 3)}

    def code(self, columns):
        """One int64 per n-gram from its n token columns: the n-gram read as a number in base V."""
        return functools.reduce(lambda code, c: code * self.V + c, columns)

    def seen_rate(self, samples, n):
        g = np.asarray([x for s in samples for x in grams(s, n)], dtype=np.int64).reshape(-1, n)
        if not len(g):
            return 0.0
        code, table = self.code(g.T), self.codes[n]
        return float((table[np.clip(np.searchsorted(table, code), 0, len(table) - 1)] == code).mean())


def ngram_metrics(samples, train_ngrams=None):
    """distinct-1/2/3, 4-gram repetition inside samples, unigram entropy (bits), seen 2-/3-gram rates in training."""
    res = {}
    for n in (1, 2, 3):
        every = [x for s in samples for x in grams(s, n)]
        res[f"distinct_{n}"] = len(set(every)) / max(len(every), 1)
    fours = [grams(s, 4) for s in samples]
    n_fours = sum(map(len, fours))
    res["repetition_4"] = (n_fours - sum(len(set(f)) for f in fours)) / max(n_fours, 1)
    counts = Counter(t for s in samples for t in s)
    total = sum(counts.values())
    res["unigram_entropy_bits"] = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
    if train_ngrams is not None:
        res.update({f"seen_{n}gram_rate": train_ngrams.seen_rate(samples, n) for n in (2, 3)})
    return res


def seen_ngrams_line(samples, data_dir):
    """sample.py's last line: the samples' seen 2-/3-gram rates in the training split of data_dir, and distinct-2."""
    from tokendata import DataError, TokenData
    try:
        m = ngram_metrics(samples, TrainNgrams.of(TokenData(data_dir, 1)))
    except DataError as e:
        return f"# no n-gram rates: {e}"
    return (f"# seen 2-gram rate {m['seen_2gram_rate']:.3f}, seen 3-gram rate {m['seen_3gram_rate']:.3f}, distinct-2 "
            f"{m['distinct_2']:.3f} (token n-grams of the samples found in the training split)")


# the history testbed's lines (testbed.py; measures.eval_testbed samples them)
def open_brackets(text):
    """The brackets text leaves open, innermost last; None if it closes one not open or holds anything else."""
    stack = []
    for c in text:
        if c in "([":
            stack.append(c)
        elif not (stack and {")": "(", "]": "["}.get(c) == stack.pop()):
            return None
    return stack


def valid_line(line):
    return bool(line) and open_brackets(line) == []


def score_completion(prefix, generated):
    """(whether generated, up to its first newline, closes exactly what prefix leaves open; brackets left open after
    it: > 0 too few closed, < 0 too many). A continuation with no newline is not valid."""
    line = prefix + generated.split("\n")[0]
    return "\n" in generated and open_brackets(line) == [], sum(map(line.count, "([")) - sum(map(line.count, ")]"))


def completion_prefixes(val_text, n, prefix_len=31):
    """The first prefix_len characters of the first n valid held-out lines longer than that (each leaves an odd
    number open; the stream's first and last lines, maybe cut, are left out)."""
    return [line[:prefix_len] for line in val_text.split("\n")[1:-1] if len(line) > prefix_len and valid_line(line)][:n]
