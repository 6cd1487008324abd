"""Data loaders: the synthetic generators, and the real sets on small slices where installed."""
import pytest

from fastcl.trainers.data import faq, lee, synthetic
from fastcl.trainers import evaluation

needs_lee = pytest.mark.skipif(lee.lee_dir() is None, reason="gensim (the Lee corpus) is not installed")
needs_python_faq = pytest.mark.skipif(not faq.python_faq(), reason="python3-doc (the Python FAQ) is not installed")
needs_debian_faq = pytest.mark.skipif(not faq.debian_faq(), reason="debian-faq is not installed")


def test_synthetic_generators_are_deterministic_and_shaped():
    assert synthetic.sentences(5, seed=1) == synthetic.sentences(5, seed=1) != synthetic.sentences(5, seed=2)
    texts, pairs = synthetic.similarity_pairs(6)
    assert len(texts) == 6 and len(pairs) == 15 and all(0.0 <= s <= 1.0 for *_, s in pairs)
    qa = synthetic.question_passages(10)
    assert all(set(q.split()) & set(p.split()) for q, p in qa)  # a shared entity word
    vocabulary = set(synthetic.vocabulary())
    assert all(set(q.split() + p.split()) <= vocabulary for q, p in qa)


@needs_lee
def test_lee_pairs_slice():
    documents, pairs = lee.rated_pairs(limit=5)
    assert len(documents) == 5 and len(pairs) == 10
    assert all(0.0 <= s <= 1.0 for *_, s in pairs)
    assert documents[0].startswith("The national executive")
    full_documents, full_pairs = lee.rated_pairs()
    assert len(full_documents) == 50 and len(full_pairs) == 1225
    sentences = lee.background_sentences(limit=20)
    assert len(sentences) == 20 and all(len(s.split()) >= 5 for s in sentences)


@needs_lee
def test_lee_document_triples_pair_neighbouring_sentences_against_another_document():
    documents = lee.background_documents()
    where = {sentence: index for index, sentences in enumerate(documents) for sentence in sentences}
    triples = lee.document_triples(seed=3)
    assert len(triples) == sum(max(0, len(d) - 1) for d in documents if d)
    for anchor, positive, negative in triples[:200]:
        sentences = documents[where[anchor]]
        assert sentences.index(positive) == sentences.index(anchor) + 1  # the next sentence of its document
        assert negative not in sentences  # a sentence of another document
    assert lee.document_triples(seed=3) == triples != lee.document_triples(seed=4)


@needs_python_faq
def test_python_faq_slice():
    pairs = faq.python_faq(limit=10)
    assert len(pairs) == 10 and all(q.endswith("?") and len(p.split()) >= 3 for q, p in pairs)
    assert not any("``" in p or ":func:" in p for _, p in pairs)  # reST markup stripped


@needs_python_faq
def test_python_doc_sections_are_titled_prose_and_never_a_faq_passage():
    sections = faq.python_doc_sections()
    assert len(sections) > 1000
    assert all(len(title.split()) >= 3 and len(body.split()) >= 20 for title, body in sections)
    assert not any(":func:" in body or "``" in body for _, body in sections)  # reST markup stripped
    faq_pairs = faq.python_faq()
    bodies = [body for _, body in sections]
    # no FAQ answer (trained or held out in DPR) is a section: not even its first 12 words
    assert not any(" ".join(p.split()[:12]) in b for _, p in faq_pairs if len(p.split()) >= 12 for b in bodies)
    titles = {title for title, _ in sections}
    assert not titles & {question for question, _ in faq_pairs}
    assert "Floating Point Arithmetic: Issues and Limitations" in titles  # the tutorial's section


@needs_debian_faq
def test_debian_faq_slice():
    pairs = faq.debian_faq(limit=10)
    assert len(pairs) == 10 and all(q.endswith("?") and "<" not in q for q, _ in pairs)
    assert not pairs[0][0][0].isdigit()  # "1.1." numbering dropped


def test_split_is_seeded_and_disjoint():
    pairs = synthetic.question_passages(50)
    train, test = faq.split(pairs, 0.7, seed=0)
    assert (train, test) == faq.split(pairs, 0.7, seed=0)
    assert len(train) == 35 and not set(train) & set(test) and len(set(train) | set(test)) == 50


def test_retrieval_metrics_against_direct_counting():
    import torch

    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.4, 0.4, 0.1]])
    relevant = torch.tensor([0, 0, 1])  # ranks 0, 2, 0 (ties do not count against)
    out = evaluation.retrieval_metrics(scores, relevant, ks=(1, 2))
    assert out["recall@1"] == pytest.approx(2 / 3) and out["recall@2"] == pytest.approx(2 / 3)
    assert out["mrr@10"] == pytest.approx((1 + 1 / 3 + 1) / 3)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    a, b = [0.1, 0.4, 0.2, 0.9], [1, 3, 2, 2]
    assert evaluation.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    with pytest.raises(ValueError, match="same length"):
        evaluation.spearman([1, 2], [1, 2, 3])
