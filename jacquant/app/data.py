"""Real English text that a package registry installs, with a fixed train/validation split.

The corpus is the reStructuredText source of the Python documentation that Debian's
``python3.X-doc`` package installs under ``/usr/share/doc/python3.X/html/_sources`` (about 500 files,
11 MB of English prose with code examples; ``apt-get install python3.11-doc``). Where that package
is absent the fallback is the documentation this Python interpreter itself ships: the language
reference topics of ``pydoc_data`` and the docstrings of the standard library (about 1 MB). The
corpus that was used is always reported, never swapped silently.

Split (fixed, documented): files sorted by path; every 10th file (index 9, 19, 29, ...) is the
validation set, the rest train. Sentences for the encoder track come from the same split.
Tokens are bytes (UTF-8), vocabulary 256.
"""
from __future__ import annotations

import functools
import glob
import importlib
import inspect
import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

DOC_GLOB = "/usr/share/doc/python3*/html/_sources"
VALID_EVERY = 10
STDLIB_MODULES = ("argparse", "collections", "csv", "dataclasses", "email.message", "functools", "json",
                  "logging", "pathlib", "subprocess", "textwrap", "threading", "unittest.case", "zipfile")


@dataclass
class Corpus:
    """Documents of one corpus, split into train and validation texts."""

    name: str
    train: list[str]
    valid: list[str]

    @functools.cached_property
    def train_bytes(self) -> Tensor:
        """The training documents joined by blank lines, as a 1-D uint8 tensor of UTF-8 bytes (built once)."""
        return to_bytes(self.train)

    @functools.cached_property
    def valid_bytes(self) -> Tensor:
        """The validation documents joined by blank lines, as a 1-D uint8 tensor of UTF-8 bytes (built once)."""
        return to_bytes(self.valid)


def to_bytes(docs: list[str]) -> Tensor:
    """UTF-8 bytes of the documents joined by a blank line, uint8 [n]."""
    data = "\n\n".join(docs).encode("utf-8", "replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, valid): document i goes to validation when i % 10 == 9 (docs in sorted-path order)."""
    train = [d for i, d in enumerate(docs) if i % VALID_EVERY != VALID_EVERY - 1]
    valid = [d for i, d in enumerate(docs) if i % VALID_EVERY == VALID_EVERY - 1]
    return train, valid


def python_doc_dir() -> str | None:
    """The newest ``/usr/share/doc/python3.X/html/_sources`` present, or None."""
    found = sorted(glob.glob(DOC_GLOB), key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    return found[-1] if found else None


def python_doc_corpus(root: str) -> Corpus:
    """Every ``*.txt`` file under ``root`` (the docs' reST sources), sorted by relative path."""
    paths = sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.txt documentation sources under {root}")
    docs = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    train, valid = split(docs)
    version = re.search(r"python3\.\d+", root)
    return Corpus(f"{version.group(0) if version else 'python'}-doc ({root}, {len(docs)} files)", train, valid)


def stdlib_corpus(modules: tuple[str, ...] = STDLIB_MODULES) -> Corpus:
    """This interpreter's own documentation: ``pydoc_data.topics`` plus stdlib docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    for name in modules:
        mod = importlib.import_module(name)
        for obj in [mod, *[v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]]:
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", name) == name:
                docs.append(doc)
    train, valid = split(docs)
    return Corpus(f"python stdlib documentation (pydoc_data + docstrings, {len(docs)} texts)", train, valid)


def load_corpus(source: str = "auto") -> Corpus:
    """The corpus for ``source``: "python-doc", "stdlib", a directory of ``*.txt`` files, or "auto".

    "auto" takes the Debian Python documentation when installed and otherwise falls back to
    "stdlib" with a warning saying how to install the larger corpus.
    """
    if source in ("auto", "python-doc"):
        root = python_doc_dir()
        if root is not None:
            return python_doc_corpus(root)
        if source == "python-doc":
            raise FileNotFoundError(f"no Python documentation under {DOC_GLOB}; apt-get install python3.11-doc")
        warnings.warn(f"no Python documentation under {DOC_GLOB} (apt-get install python3.11-doc); "
                      "using the smaller stdlib documentation corpus", stacklevel=2)
        return stdlib_corpus()
    if source == "stdlib":
        return stdlib_corpus()
    if os.path.isdir(source):
        return python_doc_corpus(source)
    raise ValueError(f"corpus {source!r} is not 'auto', 'python-doc', 'stdlib' or a directory of *.txt files")


OTHER_TEXT = "/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"  # Debian's debian-faq package: English prose


def other_english_text(path: str = OTHER_TEXT) -> str:
    """A second English text that nothing is trained or tuned on: the Debian FAQ (``apt-get install debian-faq``),
    plain text with its indentation collapsed (runs of spaces become one; line breaks stay).

    It is prose about an operating system, not Python: perplexity on it shows what QAT on the Python
    documentation does to the model's English outside that domain (the main job's windows reward adapting to
    the docs). Raises FileNotFoundError naming the package when it is absent.
    """
    import gzip

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; apt-get install debian-faq (the second English text)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines())


_MARKUP = re.compile(r"[`*:_|<>\\=~^#\[\]{}]|\.\.")


def sentences(docs: list[str], min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences of the documents: paragraphs split at '. ', without markup or code lines.

    A line is kept when it starts with a letter and has no reST markup characters; sentences with
    ``min_words`` to ``max_words`` words are returned, in document order, without duplicates.
    """
    out, seen = [], set()
    for doc in docs:
        for para in doc.split("\n\n"):
            lines = [ln.strip() for ln in para.splitlines()]
            if not lines or not all(ln[:1].isalpha() for ln in lines) or any(_MARKUP.search(ln) for ln in lines):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(lines)):
                n = len(s.split())
                if min_words <= n <= max_words and s[-1:] in ".!?" and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def windows(data: Tensor, batch: int, seq: int, steps: int, seed: int, device: str | torch.device = "cpu"):
    """``steps`` batches of ``batch`` random windows of ``seq + 1`` bytes (int64 [batch, seq + 1] on ``device``)."""
    if len(data) <= seq + 1:
        raise ValueError(f"text of {len(data)} bytes is shorter than one window of {seq + 1}")
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[j:j + seq + 1] for j in i.tolist()]).long().to(device)
