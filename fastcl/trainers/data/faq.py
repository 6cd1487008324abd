"""Question -> passage pairs from two FAQs installed by Debian packages.

- Python FAQ (``python3.X-doc``): ``/usr/share/doc/python3*/html/_sources/faq/*.rst.txt``; a
  section title ending in "?" is a question, the section's text up to the next title its passage.
- Debian FAQ (``debian-faq``): ``/usr/share/doc/debian/FAQ/*.en.html``; an ``<h2>``/``<h3>``
  heading ending in "?" is a question (its "1.2." number dropped), the text up to the next
  heading its passage.
- The rest of the Python docs (never ``faq/``): every section title -> the prose of its section,
  extra title/passage pairs for DPR's training (a second, related dataset, as the paper trains its
  small sets together with the large ones).
"""
from __future__ import annotations

import glob
import html
import random
import re
from html.parser import HTMLParser
from typing import Dict, List, Optional, Tuple

from ..engine import DataUnavailable

PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources/**/*.rst.txt"
PYTHON_FAQ_GLOB = "/usr/share/doc/python3*/html/_sources/faq/*.rst.txt"
DEBIAN_FAQ_GLOB = "/usr/share/doc/debian/FAQ/*.en.html"
INSTALL = "make data (or apt-get install python3-doc debian-faq)"
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def _clean_rst(text: str) -> str:
    text = re.sub(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)  # :func:`name <target>` -> name
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)                 # `label <url>`_ -> label
    text = text.replace("``", "").replace("`", "")
    text = re.sub(r"^\s*\.\. [^\n]*$", " ", text, flags=re.M)               # directives
    return " ".join(text.split())


def python_doc_files(pattern: str = PYTHON_DOCS_GLOB) -> Dict[str, str]:
    """{path under _sources/: file} with one copy of each (whichever python3.X-doc is installed)."""
    files: Dict[str, str] = {}
    for path in sorted(glob.glob(pattern, recursive=True)):
        files.setdefault(path.split("/_sources/", 1)[1], path)
    return files


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def section_titles(lines: List[str]) -> List[int]:
    """Line numbers of reST section titles (a text line over an underline at least as long)."""
    return [i for i in range(len(lines) - 1)
            if lines[i].strip() and _UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].strip()) >= len(lines[i].strip())
            and not _UNDERLINE.match(lines[i])]


def sections(lines: List[str]) -> List[Tuple[str, str]]:
    """(title, raw text up to the next title) of each reST section of ``lines``."""
    titles = section_titles(lines)
    ends = titles[1:] + [len(lines)]
    return [(lines[start].strip(), "\n".join(lines[start + 2:end])) for start, end in zip(titles, ends)]


def prose_paragraphs(text: str, min_words: int = 1) -> List[str]:
    """The prose paragraphs of reST text, cleaned; code, doctests, directives, field lists and
    underlines left out."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip() and not _UNDERLINE.match(line.strip())]
        if not lines or lines[0].startswith("    ") or lines[0].lstrip().startswith((">>>", "..", ":")):
            continue
        paragraph = _clean_rst("\n".join(lines))
        if len(paragraph.split()) >= min_words:
            paragraphs.append(paragraph)
    return paragraphs


def python_faq(limit: Optional[int] = None) -> List[Tuple[str, str]]:
    """(question, passage) pairs of the Python FAQ (one copy, whichever python3.X-doc is installed)."""
    files = python_doc_files(PYTHON_FAQ_GLOB)
    pairs = []
    for name in sorted(files):
        for title, text in sections(_read_lines(files[name])):
            body = _clean_rst(text)
            if title.endswith("?") and len(body.split()) >= 3:
                pairs.append((_clean_rst(title), body))
    return pairs[:limit] if limit is not None else pairs


def python_doc_sections(min_title_words: int = 3, min_words: int = 20) -> List[Tuple[str, str]]:
    """(section title, its prose) of every Python doc outside ``faq/`` (so no FAQ passage, trained
    or held out, is among them): titles of at least ``min_title_words`` words, sections of at
    least ``min_words`` words of prose. Empty when python3-doc is not installed."""
    files = python_doc_files()
    pairs = []
    for name in sorted(files):
        if name.startswith("faq/"):
            continue
        for title, text in sections(_read_lines(files[name])):
            title, body = _clean_rst(title), " ".join(prose_paragraphs(text))
            if len(title.split()) >= min_title_words and len(body.split()) >= min_words:
                pairs.append((title, body))
    return pairs


class _Sections(HTMLParser):
    """Splits a DocBook HTML page at its h2/h3 headings: [(heading, text)]."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: List[List[str]] = []
        self.in_heading = False
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "h3"):
            self.in_heading = True
            self.sections.append(["", ""])
        elif tag in ("script", "style"):
            self.skip += 1

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self.in_heading = False
        elif tag in ("script", "style") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if self.skip or not self.sections:
            return
        self.sections[-1][0 if self.in_heading else 1] += data


def debian_faq(limit: Optional[int] = None) -> List[Tuple[str, str]]:
    """(question, passage) pairs of the Debian FAQ."""
    pairs = []
    for path in sorted(glob.glob(DEBIAN_FAQ_GLOB)):
        parser = _Sections()
        with open(path, encoding="utf-8", errors="replace") as f:
            parser.feed(f.read())
        for heading, body in parser.sections:
            question = re.sub(r"^\s*[\d.]+\s*", "", " ".join(heading.split()))
            body = " ".join(html.unescape(body).split())
            if question.endswith("?") and len(body.split()) >= 3:
                pairs.append((question, body))
    return pairs[:limit] if limit is not None else pairs


def question_passages(limit: Optional[int] = None) -> List[Tuple[str, str]]:
    """Both FAQs pooled (Python first); DataUnavailable when neither is installed."""
    pairs = python_faq() + debian_faq()
    if not pairs:
        raise DataUnavailable(f"--data real: neither the Python FAQ ({PYTHON_FAQ_GLOB}) nor the Debian FAQ "
                              f"({DEBIAN_FAQ_GLOB}) is installed: {INSTALL}")
    return pairs[:limit] if limit is not None else pairs


def split(pairs: List[Tuple[str, str]], train_fraction: float = 0.7, seed: int = 0):
    """Question indices (train, test): a seeded shuffle of the questions, ``train_fraction`` to training."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    cut = int(round(train_fraction * len(order)))
    return sorted(order[:cut]), sorted(order[cut:])


def first_sentence(text: str, max_words: int = 40) -> str:
    sentence = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[0]
    return " ".join(sentence.split()[:max_words])


def simcse_triples() -> List[Tuple[str, str, str]]:
    """Stand-in for NLI (anchor, entailment, contradiction) triples: a FAQ question, its answer's
    first sentence, and the first sentence of the next answer of the same FAQ (a close topic)."""
    out = []
    for pairs in (python_faq(), debian_faq()):
        for index, (question, passage) in enumerate(pairs):
            other = pairs[(index + 1) % len(pairs)][1]
            out.append((question, first_sentence(passage), first_sentence(other)))
    if not out:
        raise DataUnavailable(f"--data real: no FAQ installed: {INSTALL}")
    return out
