"""An offline zero-shot suite built deterministically from a corpus' held-out split.

None of the paper's task datasets can be fetched here, so this suite gives every checkpoint a
downstream number from text it never trained on. Three lm-eval tasks, written as jsonl + YAML:

    hyperloop_lastword      LAMBADA-style: a passage of >= 40 words whose last word is the target
                            (sentence punctuation after it dropped). loglikelihood of " target":
                            acc = the target is the greedy continuation, perplexity of the target.
    hyperloop_lastword_gen  the same items through greedy generation: exact match of the first
                            generated word with the target.
    hyperloop_cloze         multiple-choice next sentence: context = the sentences before the target
                            sentence (>= 15 words), choices = the true next sentence and 3 sentences
                            of similar length from the same document. acc and acc_norm (the log-
                            likelihood divided by the choice's length in characters, lm-eval's rule).

Why the cloze cannot be solved by a rule that looks only at the choices: the 4 sentences of an item
are chosen first, as a group (similar character length, at least 7 sentences apart so none lies in
another's context or right after it), and only then is the true one drawn uniformly from the group.
Given the group, every member is equally likely to be the answer, so longest / shortest / first /
fewest-tokens (what an untrained model's summed log-likelihood prefers) all score 1/4 in
expectation; only the relation between context and sentence carries signal. `trivial_baselines`
measures this on the built files.

The directory `data_dir()/tasks/<corpus id>/v1/` (a parameter hash is appended when the defaults are
changed) holds `<task>.jsonl`, `<task>.yaml` (dataset_path: json, absolute data_files, its own HF
cache) and `manifest.json` (suite version, corpus, parameters, item counts, sha256 of each file).
It is built once, atomically, and reused; bump SUITE_VERSION whenever the construction changes.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from hyperloop_lm.utils import UserError, atomic_dir, data_dir

SUITE_VERSION = "v1"
LASTWORD, LASTWORD_GEN, CLOZE = "hyperloop_lastword", "hyperloop_lastword_gen", "hyperloop_cloze"
TASKS = (LASTWORD, LASTWORD_GEN, CLOZE)
# The metric each task contributes to the suite's Task Acc. The generation task measures the same
# skill as hyperloop_lastword, so it is reported beside the mean rather than counted twice.
TASK_ACC_METRIC = {LASTWORD: "acc", LASTWORD_GEN: None, CLOZE: "acc_norm"}


@dataclass(frozen=True)
class SuiteParams:
    max_items: int = 1000  # per task, sampled across all documents (seeded)
    passage_min_words: int = 40  # last-word passages: whole sentences, at least this long...
    passage_max_words: int = 120  # ...and at most this (longer ones are skipped)
    context_min_words: int = 15  # cloze context: sentences before the target, at least this long...
    context_max_sentences: int = 6  # ...using at most this many sentences
    choice_min_words: int = 5  # cloze choices: ordinary sentences, not headings or speaker tags
    choice_max_words: int = 40
    max_length_ratio: float = 1.3  # longest / shortest choice of an item, in characters
    n_choices: int = 4
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# text -> sentences

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "no", "gen", "gov", "sen", "rep",
                  "prof", "mt", "co", "inc", "ltd", "lt", "col", "capt", "sgt", "ft", "vol", "ch", "fig", "u.s",
                  "e.g", "i.e", "a.m", "p.m", "d.c", "u.n", "u.k"}
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[\"“‘(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]+(?:['’-][A-Za-z]+)*)([^\sA-Za-z0-9]*)$")
_WORD = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*")


def split_sentences(text: str) -> list[str]:
    """Sentences of a document, whitespace collapsed. Paragraphs (blank lines) always end a sentence;
    inside one, a sentence ends at .!? (+ closing quotes) before a capital, unless the word is a
    known abbreviation or an initial ("Mr. Smith", "J. Doe")."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        start = 0
        for m in _BOUNDARY.finditer(para):
            word = para[start:m.start() + 1].split()[-1].lower().rstrip(".")
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
            out.append(para[start:m.end()].strip())
            start = m.end()
        if para[start:].strip():
            out.append(para[start:].strip())
    return out


def _is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    """An ordinary sentence: length in range, mostly letters, not an all-caps heading/speaker tag."""
    words = sentence.split()
    letters = sum(c.isalpha() for c in sentence)
    return (min_words <= len(words) <= max_words and letters >= 0.6 * len(sentence)
            and any(c.islower() for c in sentence))


# ---------------------------------------------------------------------------------------------
# items


def lastword_items(doc: str, doc_id: str, p: SuiteParams) -> list[dict[str, Any]]:
    """Non-overlapping passages of whole sentences ending at a sentence whose last token is a word."""
    sents, items, free = split_sentences(doc), [], 0
    for t, sent in enumerate(sents):
        m = _LAST_WORD.match(sent)
        if not m or not re.search(r"[.!?]", m.group(3)) or len(m.group(2)) < 2:
            continue
        j, words = t, len(sent.split())
        while words < p.passage_min_words and j > free:
            j -= 1
            words += len(sents[j].split())
        if words < p.passage_min_words or words > p.passage_max_words:
            continue
        context = " ".join([*sents[j:t], m.group(1)])
        items.append({"id": f"{doc_id}:{t}", "doc": doc_id, "context": context, "target": m.group(2),
                      "continuation": " " + m.group(2)})
        free = t + 1
    return items


def cloze_items(doc: str, doc_id: str, p: SuiteParams, rng: random.Random) -> list[dict[str, Any]]:
    """Groups of similar-length sentences far apart in the document; the answer is drawn from the group."""
    sents = split_sentences(doc)

    def context_start(i: int) -> int | None:  # first sentence of i's context, None if too little text
        j, words = i, 0
        while j > 0 and i - j < p.context_max_sentences and words < p.context_min_words:
            j -= 1
            words += len(sents[j].split())
        return j if words >= p.context_min_words else None

    pool = [i for i, s in enumerate(sents)
            if _is_prose(s, p.choice_min_words, p.choice_max_words) and context_start(i) is not None]
    pool.sort(key=lambda i: (len(sents[i]), i))
    gap = p.context_max_sentences + 1  # no member inside another's context, none right after another
    items = []
    while pool:
        group = [pool[0]]
        for i in pool[1:]:
            if len(sents[i]) > p.max_length_ratio * len(sents[group[0]]):
                break
            if all(abs(i - g) >= gap and sents[i] != sents[g] for g in group):
                group.append(i)
                if len(group) == p.n_choices:
                    break
        if len(group) < p.n_choices:
            pool.pop(0)
            continue
        pool = [i for i in pool if i not in group]
        target = rng.choice(sorted(group))  # uniform over the group: the heart of the no-trivial-rule argument
        order = sorted(group)
        rng.shuffle(order)
        items.append({"id": f"{doc_id}:{target}", "doc": doc_id,
                      "context": " ".join(sents[context_start(target):target]),
                      "choices": [sents[i] for i in order], "gold": order.index(target)})
    return items


def build_items(documents: Iterable[str], p: SuiteParams = SuiteParams()) -> dict[str, list[dict[str, Any]]]:
    """{task: items}: all candidates from every document, then a seeded sample of `max_items`, in a
    seeded order (so lm-eval's --limit N takes a sample spread over all documents)."""
    lastword, cloze = [], []
    for k, doc in enumerate(documents):
        lastword += lastword_items(doc, f"d{k}", p)
        cloze += cloze_items(doc, f"d{k}", p, random.Random(f"{p.seed}:cloze:{k}"))
    out = {}
    for name, items in ((LASTWORD, lastword), (CLOZE, cloze)):
        rng = random.Random(f"{p.seed}:{name}")
        out[name] = rng.sample(items, min(p.max_items, len(items)))
    out[LASTWORD_GEN] = out[LASTWORD]
    return out


# ---------------------------------------------------------------------------------------------
# files


def _task_yaml(task: str, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    common = {"task": task, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
              "test_split": "test", "doc_to_text": "context", "metadata": {"version": SUITE_VERSION}}
    if task == LASTWORD:
        return {**common, "output_type": "loglikelihood", "doc_to_target": "continuation",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if task == LASTWORD_GEN:
        return {**common, "output_type": "generate_until", "doc_to_target": "target",
                "generation_kwargs": {"until": ["\n", ".", ",", ";", ":", "!", "?"], "max_gen_toks": 8,
                                      "do_sample": False},
                "filter_list": [{"name": "first-word", "filter": [
                    {"function": "regex", "regex_pattern": _WORD.pattern}, {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def suite_dir(corpus_id: str, params: SuiteParams = SuiteParams()) -> Path:
    tag = SUITE_VERSION
    if params != SuiteParams():
        tag += "-" + hashlib.sha256(json.dumps(asdict(params), sort_keys=True).encode()).hexdigest()[:8]
    return data_dir() / "tasks" / corpus_id / tag


def build_suite(corpus, params: SuiteParams = SuiteParams(), root: Path | None = None) -> Path:
    """Write (or reuse) the suite for `corpus` (a `hyperloop_lm.data.Corpus`); return its directory,
    ready for lm-eval's include_path."""
    root = Path(root) if root is not None else suite_dir(corpus.id, params)
    manifest = _read_manifest(root)
    if manifest and manifest["suite_version"] == SUITE_VERSION and manifest["params"] == asdict(params) \
            and manifest["corpus"]["id"] == corpus.id:
        return root
    items = build_items(corpus.documents("val"), params)
    if min(len(v) for v in items.values()) == 0:
        raise UserError(f"corpus {corpus.name}'s held-out split is too small for the offline suite "
                        f"({ {k: len(v) for k, v in items.items()} } items); use a corpus with more held-out text")
    with atomic_dir(root) as tmp:
        files = {}
        for task in TASKS:
            data_file = root / f"{task}.jsonl" if task != LASTWORD_GEN else root / f"{LASTWORD}.jsonl"
            if task != LASTWORD_GEN:
                text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items[task])
                (tmp / data_file.name).write_text(text, encoding="utf-8")
                files[data_file.name] = hashlib.sha256(text.encode()).hexdigest()
            # YAMLs name the final location: the directory is renamed into place below.
            (tmp / f"{task}.yaml").write_text(yaml.safe_dump(_task_yaml(task, data_file, root / ".hf-cache"),
                                                              sort_keys=False, allow_unicode=True))
        manifest = {"suite_version": SUITE_VERSION, "corpus": {"name": corpus.name, "id": corpus.id},
                    "params": asdict(params), "tasks": {t: len(items[t]) for t in TASKS}, "sha256": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def load_items(root: Path, task: str) -> list[dict[str, Any]]:
    name = f"{LASTWORD if task == LASTWORD_GEN else task}.jsonl"
    with open(Path(root) / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# trivial rules (what a task must not be solvable by)


def trivial_baselines(root: Path, tokenizer=None) -> dict[str, dict[str, float]]:
    """Accuracy of rules that ignore the meaning of the text. Cloze: pick the first / last / longest /
    shortest choice (chance = 1/4); with a tokenizer also fewest / most tokens, which is what an
    untrained model's summed log-likelihood amounts to. Last word: guess the most frequent word of
    the context, or its last word (LAMBADA's classic baselines; chance is ~0 here, these show how
    much copying from the context alone can reach)."""
    cloze = load_items(root, CLOZE)
    rules = {"first": lambda c: 0, "last": lambda c: len(c) - 1,
             "longest": lambda c: max(range(len(c)), key=lambda i: len(c[i])),
             "shortest": lambda c: min(range(len(c)), key=lambda i: len(c[i]))}
    if tokenizer is not None:
        n_tok = lambda s: len(tokenizer.encode(" " + s))  # noqa: E731
        rules["fewest_tokens"] = lambda c: min(range(len(c)), key=lambda i: n_tok(c[i]))
        rules["most_tokens"] = lambda c: max(range(len(c)), key=lambda i: n_tok(c[i]))
    out = {CLOZE: {name: sum(rule(it["choices"]) == it["gold"] for it in cloze) / len(cloze)
                   for name, rule in rules.items()}}
    out[CLOZE]["chance"] = 1 / len(cloze[0]["choices"])
    lastword = load_items(root, LASTWORD)

    def most_frequent(context: str) -> str:
        words = [w for w in _WORD.findall(context) if len(w) >= 3]
        return Counter(words).most_common(1)[0][0] if words else ""

    out[LASTWORD] = {"most_frequent_context_word": sum(most_frequent(it["context"]) == it["target"]
                                                       for it in lastword) / len(lastword),
                     "last_context_word": sum((_WORD.findall(it["context"]) or [""])[-1] == it["target"]
                                              for it in lastword) / len(lastword)}
    return out


# ---------------------------------------------------------------------------------------------
# running


def run_offline_suite(checkpoint_dir: str | Path, limit: int | float | None = None, *, corpus: str | None = None,
                      params: SuiteParams = SuiteParams(), output: str | Path | None = None,
                      **lm_kwargs: Any) -> dict[str, Any]:
    """Build (cached) the offline suite from the held-out split of the checkpoint's training corpus
    (or `corpus`) and run it through the lm-eval adapter. Returns the results dict of
    `hyperloop_lm.eval.zeroshot.evaluate_tasks`: tasks -> metrics, task_acc, suite, checkpoint, ...
    `lm_kwargs` go to `HyperloopLM` (batch_size, device, max_length, loops, progress)."""
    from hyperloop_lm.eval.zeroshot import evaluate_tasks

    return evaluate_tasks(checkpoint_dir, list(TASKS), limit=limit, corpus=corpus, suite_params=params,
                          output=output, **lm_kwargs)
