"""Small synthetic stand-ins for the real data sets, with the same shapes and a learnable signal.

Text: a made-up vocabulary of ``topics`` topics (``words_per_topic`` words each, ``t3w7`` is
word 7 of topic 3), entity words (``e42``) and filler words. A sentence mixes words of one
topic with fillers; a question and its passage share an entity word and a topic; a similarity
pair's "human" score is the overlap of the two documents' topic mixtures. Everything is a pure
function of the seed.
"""
from __future__ import annotations

import random
from typing import List, Tuple

TOPICS = 8
WORDS_PER_TOPIC = 12
FILLERS = 24
ENTITIES = 400


def vocabulary() -> List[str]:
    """Every word the generators use (a tokenizer's vocabulary for the tiny test model)."""
    words = [f"t{t}w{w}" for t in range(TOPICS) for w in range(WORDS_PER_TOPIC)]
    words += [f"f{i}" for i in range(FILLERS)] + [f"e{i}" for i in range(ENTITIES)]
    words += ["instruct", "query", "retrieve", "passages", "that", "answer", "the", "question", "find", "similar", "text", ":"]
    return words


def _topic_words(rng: random.Random, topic: int, count: int) -> List[str]:
    return [f"t{topic}w{rng.randrange(WORDS_PER_TOPIC)}" for _ in range(count)]


def _fillers(rng: random.Random, count: int) -> List[str]:
    return [f"f{rng.randrange(FILLERS)}" for _ in range(count)]


def sentences(count: int, seed: int = 0) -> List[Tuple[str, int]]:
    """(sentence, topic) pairs: 5 topic words and 3 fillers, shuffled."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        topic = rng.randrange(TOPICS)
        words = _topic_words(rng, topic, 5) + _fillers(rng, 3)
        rng.shuffle(words)
        out.append((" ".join(words), topic))
    return out


def similarity_pairs(documents: int = 24, seed: int = 1) -> Tuple[List[str], List[Tuple[int, int, float]]]:
    """Documents made of two topics in random proportions, and every pair's score: the overlap
    (sum of minima) of their topic mixtures. Stand-in for the Lee corpus's human ratings."""
    rng = random.Random(seed)
    texts, mixtures = [], []
    for _ in range(documents):
        first, second = rng.sample(range(TOPICS), 2)
        share = rng.choice([0.25, 0.5, 0.75, 1.0])
        count = 12
        words = _topic_words(rng, first, round(count * share)) + _topic_words(rng, second, count - round(count * share))
        words += _fillers(rng, 4)
        rng.shuffle(words)
        texts.append(" ".join(words))
        mixture = [0.0] * TOPICS
        mixture[first] += share
        mixture[second] += 1 - share
        mixtures.append(mixture)
    pairs = [(i, j, sum(min(a, b) for a, b in zip(mixtures[i], mixtures[j])))
             for i in range(documents) for j in range(i + 1, documents)]
    return texts, pairs


def question_passages(count: int, seed: int = 2) -> List[Tuple[str, str]]:
    """(question, passage) pairs sharing an entity word and a topic; passages are longer."""
    rng = random.Random(seed)
    entities = rng.sample(range(ENTITIES), count) if count <= ENTITIES else [rng.randrange(ENTITIES) for _ in range(count)]
    out = []
    for entity in entities:
        topic = rng.randrange(TOPICS)
        question = _topic_words(rng, topic, 3) + [f"e{entity}"] + _fillers(rng, 2)
        passage = _topic_words(rng, topic, 6) + [f"e{entity}"] + _fillers(rng, 5)
        rng.shuffle(question)
        rng.shuffle(passage)
        out.append((" ".join(question), " ".join(passage)))
    return out
