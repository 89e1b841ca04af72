"""Corpora: a manifest plus one jsonl of documents per split, built once and cached.

Every source (the built-in `english-mix`, a user's files, a Hugging Face dataset) is turned into
the same on-disk form under `data_dir()/corpora/...`:

    manifest.json   {manifest_version, name, id, sources, split_rule, splits, documents: [...]}
    train.jsonl     one {"source", "name", "text"} per line, in manifest order
    val.jsonl

so the tokenizer, the shards and the cache keys only ever see a `Corpus`. The corpus `id` hashes
the document list (source, name, split, sha256 of the text), so the same text gives the same id
wherever it came from, and any change in content or split gives a new one.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from hyperloop_lm.data.text import decode, normalize
from hyperloop_lm.utils import UserError, atomic_dir, closest, data_dir

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.02
TEXT_SUFFIXES = (".txt", ".md", ".rst")  # what a directory source picks up (recursively)


@dataclass
class Document:
    source: str  # where it came from: 'sotu', 'brown', 'file', ...
    name: str  # unique within the corpus, stable (the split hash uses it)
    split: str  # 'train' | 'val'
    text: str


@dataclass
class Corpus:
    """A built corpus on disk. Iterate documents with `documents(split)`; metadata from the manifest."""

    root: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def replaced_chars(self) -> int:
        """Invalid UTF-8 sequences replaced by U+FFFD while reading the source."""
        return self.manifest["replaced_chars"]

    def n_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's (normalized) text: the denominator of bits-per-byte."""
        return self.manifest["splits"][_check_split(split)]["bytes"]

    def n_documents(self, split: str) -> int:
        return self.manifest["splits"][_check_split(split)]["documents"]

    def documents(self, split: str) -> Iterator[str]:
        """The split's document texts, in manifest order (deterministic)."""
        with open(self.root / f"{_check_split(split)}.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    def __repr__(self) -> str:
        s = self.manifest["splits"]
        return (f"Corpus({self.name!r}, id={self.id}, train={s['train']['documents']} docs/"
                f"{s['train']['bytes'] / 1e6:.2f} MB, val={s['val']['documents']} docs/{s['val']['bytes'] / 1e6:.2f} MB)")


def load_corpus(spec: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """Load (building and caching on first use) the corpus named by `spec`.

    `spec` is a built-in name (`english-mix`, `english-large`), `hf:NAME[:CONFIG]`, or a path:
    a text file, a directory (recursive *.txt/*.md/*.rst), a glob, or a `.jsonl` file (field
    `text`, or `file.jsonl:FIELD`). `val_fraction` applies to user corpora only; built-in corpora
    have a fixed, documented split.
    """
    from hyperloop_lm.data import builtin

    if spec in builtin.CORPORA:
        return builtin.load(spec)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (got {val_fraction}); 0.01-0.05 is typical.")
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], val_fraction)
    return _load_user(spec, val_fraction)


# ---------------------------------------------------------------------------------------------
# writing (shared by every source)


def open_corpus(root: Path) -> Corpus | None:
    """The cached corpus in `root`, or None if absent or written by another manifest version."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        return None
    return Corpus(root, manifest)


def write_corpus(root: Path, name: str, documents: Iterable[Document], *, sources: list[dict],
                 split_rule: str, replaced_chars: int = 0) -> Corpus:
    """Normalize and write `documents` as a corpus in `root` (built beside it, then renamed in).

    If a valid corpus appears in `root` meanwhile (a concurrent builder), that one is kept.
    """
    # a valid corpus already in `root` (absent, or a stale build from another manifest version, is replaced)
    with atomic_dir(root, keep_existing=lambda: open_corpus(root) is not None) as tmp:
        entries: list[dict] = []
        splits = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        files = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        with files["train"], files["val"]:
            for doc in documents:
                text = normalize(doc.text)
                if not text:
                    continue
                raw = text.encode()
                entries.append({"source": doc.source, "name": doc.name, "split": _check_split(doc.split),
                                "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
                splits[doc.split]["documents"] += 1
                splits[doc.split]["bytes"] += len(raw)
                files[doc.split].write(json.dumps({"source": doc.source, "name": doc.name, "text": text},
                                                  ensure_ascii=False) + "\n")
        if not entries:
            raise UserError(f"corpus {name!r} has no text after reading it; point --corpus at non-empty text files.")
        key = json.dumps([MANIFEST_VERSION] + [[e["source"], e["name"], e["split"], e["sha256"]] for e in entries])
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "name": name,
            "id": hashlib.sha256(key.encode()).hexdigest()[:16],
            "sources": sources,
            "split_rule": split_rule,
            "replaced_chars": replaced_chars,
            "splits": splits,
            "documents": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    corpus = open_corpus(root)
    if corpus is None:
        raise UserError(f"could not write the corpus cache at {root}; check that the directory is writable.")
    log.info("built %r in %s", corpus, root)
    return corpus


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# ---------------------------------------------------------------------------------------------
# user corpora


def _load_user(spec: str, val_fraction: float) -> Corpus:
    files, field, base = _resolve_user_spec(spec)
    # Cache key: what was asked for and the files' identity (size + mtime), so an edit rebuilds.
    stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = hashlib.sha256(json.dumps([MANIFEST_VERSION, field, val_fraction, stats]).encode()).hexdigest()[:16]
    root = data_dir() / "corpora" / "user" / key
    corpus = open_corpus(root)
    if corpus is not None:
        return corpus

    docs: list[Document] = []
    replaced = 0
    for path in files:
        rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
        text, n_bad = decode(path.read_bytes())
        replaced += n_bad
        if n_bad:
            log.warning("%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD", rel, n_bad)
        if path.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_documents(text, rel, field or "text"))
        else:
            docs.append(Document("file", rel, "train", normalize(text)))
    docs = [d for d in docs if d.text]
    if not docs:
        raise UserError(f"--corpus {spec!r} matched {len(files)} file(s) but they hold no text; "
                        "point it at non-empty text.")
    if replaced:
        log.warning("corpus %s: %d invalid UTF-8 sequence(s) replaced in total", spec, replaced)
    rule, docs = split_documents(docs, val_fraction)
    return write_corpus(root, spec, docs, sources=[{"client": "local", "spec": spec, "field": field}],
                        split_rule=rule, replaced_chars=replaced)


def _resolve_user_spec(spec: str) -> tuple[list[Path], str | None, Path]:
    """(files, jsonl field or None, base directory that document names are relative to)."""
    path = Path(spec).expanduser()
    field = None
    if not path.exists() and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        if head.endswith(".jsonl") and Path(head).expanduser().is_file():
            path, field = Path(head).expanduser(), tail
    if path.is_file():
        return [path], field, path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"directory {spec!r} has no {'/'.join('*' + s for s in TEXT_SUFFIXES)} files; "
                            "point --corpus at a directory of text files, a file, a glob or a .jsonl.")
        return files, None, path
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"the glob {spec!r} matches no files; check the pattern (use ** for subdirectories).")
        return files, None, Path(os.path.commonpath([p.parent for p in files]))
    from hyperloop_lm.data import builtin

    raise UserError(f"--corpus {spec!r} is not a file, directory, glob or built-in corpus"
                    f"{closest(spec, builtin.CORPORA)}; built-in corpora: {', '.join(builtin.CORPORA)}.")


def _jsonl_documents(text: str, rel: str, field: str) -> Iterator[Document]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"line {lineno} of {rel} is not valid JSON; fix it or remove the line.") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"line {lineno} of {rel} has no string field {field!r} (it has: {keys}); "
                            f"name the text field as --corpus {rel}:FIELD.")
        yield Document("jsonl", f"{rel}:{lineno}", "train", normalize(value))


def split_documents(docs: list[Document], val_fraction: float) -> tuple[str, list[Document]]:
    """Assign train/val deterministically; return (a sentence describing the rule, documents).

    Several documents: a document goes to val when sha256(name) falls below val_fraction (so the
    split is stable as documents are added), with at least one val and one train document.
    One document: its last val_fraction of characters (cut at a nearby line break) becomes val.
    """
    if len(docs) == 1:
        doc = docs[0]
        cut = _cut_near(doc.text, int(len(doc.text) * (1 - val_fraction)))
        rule = f"single document: its last {val_fraction:.0%} (cut at a line break) is val"
        return rule, [Document(doc.source, f"{doc.name}#head", "train", doc.text[:cut]),
                      Document(doc.source, f"{doc.name}#tail", "val", doc.text[cut:])]

    def u(name: str) -> float:  # a uniform number in [0, 1) fixed by the name
        return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64

    scores = [u(d.name) for d in docs]
    val = {i for i, s in enumerate(scores) if s < val_fraction}
    if not val:
        val = {min(range(len(docs)), key=scores.__getitem__)}
    if len(val) == len(docs):
        val.discard(max(range(len(docs)), key=scores.__getitem__))
    for i, d in enumerate(docs):
        d.split = "val" if i in val else "train"
    rule = (f"a document is val when sha256(name) as a fraction of 2**64 is below {val_fraction} "
            "(at least one val and one train document)")
    return rule, docs


def _cut_near(text: str, target: int) -> int:
    """A cut index near `target` with text on both sides: just after the nearest line break, else
    space, that is within half the tail's length (so val stays within +-50% of its share)."""
    slack = (len(text) - target) // 2
    for sep in ("\n", " "):
        after, before = text.find(sep, target, len(text) - 1), text.rfind(sep, 1, target)
        cuts = [i + 1 for i in (after, before) if i != -1 and abs(i + 1 - target) <= slack]
        if cuts:
            return min(cuts, key=lambda i: abs(i - target))
    return min(max(target, 1), len(text) - 1)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (optional)


def _load_hf(spec: str, val_fraction: float) -> Corpus:
    name, _, config = spec.partition(":")
    try:
        import datasets  # optional: pip install 'hyperloop-lm[datasets]'
    except ImportError:
        raise UserError(f"--corpus hf:{spec} needs the `datasets` package: pip install 'hyperloop-lm[datasets]', "
                        "or point --corpus at local text.") from None
    slug = hashlib.sha256(spec.encode()).hexdigest()[:16]
    root = data_dir() / "corpora" / "hf" / slug
    corpus = open_corpus(root)
    if corpus is not None:
        return corpus
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name, gated...: all expected user-facing failures
        raise UserError(f"could not load Hugging Face dataset {spec!r} ({type(e).__name__}: {str(e)[:200]}); "
                        "check the name and network (HF_DATASETS_OFFLINE=1 uses only the local cache).") from None
    if "train" not in ds or "text" not in ds["train"].column_names:
        raise UserError(f"Hugging Face dataset {spec!r} needs a 'train' split with a 'text' column; "
                        "export it to a .jsonl and use --corpus FILE.jsonl:FIELD instead.")
    docs = [Document("hf", f"train:{i}", "train", normalize(t)) for i, t in enumerate(ds["train"]["text"])]
    docs = [d for d in docs if d.text]
    held_out = next((s for s in ("validation", "valid", "test") if s in ds), None)
    if held_out:
        docs += [Document("hf", f"{held_out}:{i}", "val", normalize(t)) for i, t in enumerate(ds[held_out]["text"])]
        rule = f"the dataset's own '{held_out}' split is val"
    else:
        rule, docs = split_documents(docs, val_fraction)
    return write_corpus(root, f"hf:{spec}", docs, sources=[{"client": "hf", "spec": spec}], split_rule=rule)
