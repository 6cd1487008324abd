"""The Lee corpus (gensim's test data): 50 news documents with human similarity ratings
(1225 scored pairs, the mean of several raters, in [0, 1]) and 300 background documents.

Files: ``gensim/test/test_data/lee.cor`` (one document per line, latin-1),
``similarities0-1.txt`` (a 50x50 upper-triangular matrix), ``lee_background.cor``.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

from ..engine import DataUnavailable

INSTALL = "the Lee corpus ships with gensim: make data (or pip install gensim)"


def lee_dir() -> Optional[str]:
    try:
        import importlib.util

        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data")
    return path if os.path.isfile(os.path.join(path, "lee.cor")) else None


def _require() -> str:
    path = lee_dir()
    if path is None:
        raise DataUnavailable(f"--data real: {INSTALL}")
    return path


def _lines(path: str) -> List[str]:
    with open(path, encoding="latin-1") as f:
        return [line.strip() for line in f if line.strip()]


def rated_pairs(limit: Optional[int] = None) -> Tuple[List[str], List[Tuple[int, int, float]]]:
    """(documents, [(i, j, human score)]) for the pairs i < j of the first ``limit`` documents."""
    path = _require()
    documents = _lines(os.path.join(path, "lee.cor"))
    with open(os.path.join(path, "similarities0-1.txt")) as f:
        matrix = [[float(x) for x in line.split()] for line in f if line.strip()]
    count = len(documents) if limit is None else min(limit, len(documents))
    if len(matrix) < count or any(len(row) < count for row in matrix[:count]):
        raise DataUnavailable(f"{path}/similarities0-1.txt is not a {count}x{count} matrix")
    pairs = [(i, j, matrix[i][j]) for i in range(count) for j in range(i + 1, count)]
    return documents[:count], pairs


def background_documents(min_words: int = 5) -> List[List[str]]:
    """The 300 background documents, each as its sentences (split at . ! ? followed by a space;
    sentences under ``min_words`` words dropped)."""
    return [[s for s in re.split(r"(?<=[.!?])\s+", document) if len(s.split()) >= min_words]
            for document in _lines(os.path.join(_require(), "lee_background.cor"))]


def background_sentences(limit: Optional[int] = None, min_words: int = 5) -> List[str]:
    """Sentences of the 300 background documents, in order."""
    out = [s for document in background_documents(min_words) for s in document]
    return out if limit is None else out[:limit]


def document_triples(seed: int = 0, min_words: int = 5) -> List[Tuple[str, str, str]]:
    """Stand-in for NLI triples from the background documents: (a sentence, the next sentence of
    its document as the positive, a sentence of another document as the negative), one per
    sentence that has a successor; the negative's document and sentence are drawn with ``seed``."""
    import random

    documents = [d for d in background_documents(min_words) if d]
    rng = random.Random(seed)
    out = []
    for index, sentences in enumerate(documents):
        for position in range(len(sentences) - 1):
            other = rng.randrange(len(documents) - 1)
            other = other + 1 if other >= index else other
            out.append((sentences[position], sentences[position + 1], rng.choice(documents[other])))
    return out
