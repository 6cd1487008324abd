"""Drop-in adapters (fastcl.integrations) against the peer each replaces, in the same run.

Every row is one loss (``loss`` parameter) with provider ``peer`` (the library's own class) or
``fastcl`` (the adapter, same constructor and call): forward + backward of the loss on
(B, 256) float32 embeddings (CPU). The cached sentence-transformers loss runs a real encoder
(the tiny BERT of the grad_cache suite) at smaller batches, since the encoder dominates.

A peer case whose estimated peak exceeds 40% of the machine's memory is recorded as skipped
("out of memory") instead of run. ``summarize`` also estimates the largest batch each provider
fits in 4 GB from the two largest batches it ran (a power law in B through both points).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..harness import Case
from .info_nce import _available_bytes

SUITE = "integrations"
BASELINE = "peer"
MODULE = __name__
PROVIDERS = ("peer", "fastcl")
DIM = 256
BUDGET_MB = 4096

# loss -> (estimated peer peak bytes at batch B, D = 256; what dominates it)
PEER_MEMORY = {
    "open_clip.ClipLoss": (lambda b: 6 * b * b * 4, "B x B logits"),
    "open_clip.SigLipLoss": (lambda b: 6 * b * b * 4, "B x B logits"),
    "st.MultipleNegativesRankingLoss": (lambda b: 2 * 4 * b * b * 4, "B x 2B scores"),
    "st.MultipleNegativesSymmetricRankingLoss": (lambda b: 2 * 6 * b * b * 4, "B x 2B scores, both directions"),
    "st.GISTEmbedLoss": (lambda b: 4 * b * b * DIM * 4, "B x B x D cosine broadcasts"),
    "pml.NTXentLoss": (lambda b: 3 * b * b * b * 4, "positive-pair x negative-pair matrix (B^3)"),
    "pml.SupConLoss": (lambda b: 8 * b * b * 4, "B x B masks"),
    "lightly.NTXentLoss": (lambda b: 12 * b * b * 4, "2B x 2B logits"),
}
LOSSES = tuple(PEER_MEMORY)


class _FixedColumns(torch.nn.Module):
    """A stand-in SentenceTransformer returning given embedding columns (the loss alone is timed)."""

    def __init__(self, columns):
        super().__init__()
        self.columns = columns

    def forward(self, features):
        return {"sentence_embedding": self.columns[int(features["column"])]}


def _lightly_peer():
    from ...integrations import lightly as lightly_ours

    return lightly_ours.peer_loss_class()


def _open_clip_peer():
    from ...integrations import open_clip as open_clip_ours

    return open_clip_ours.peer_loss_module(from_file=True)


def _gist(provider, columns):
    """A GISTEmbedLoss whose model and guide return given embeddings (constructor bypassed: it
    insists on real tokenizers), for ``provider``."""
    import sentence_transformers.sentence_transformer.losses.gist_embed as peer_module
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    from ...integrations import sentence_transformers as ours

    generator = torch.Generator().manual_seed(1)
    guide_columns = [c.detach() + 0.5 * torch.randn(c.shape, generator=generator) for c in columns]
    cls = GISTEmbedLoss if provider == "peer" else ours.GISTEmbedLoss
    loss = cls.__new__(cls)
    torch.nn.Module.__init__(loss)
    loss.model, loss.guide = _FixedColumns(columns), _FixedColumns(guide_columns)
    loss.temperature, loss.margin_strategy, loss.margin = 0.01, "absolute", 0.0
    loss.contrast_anchors = loss.contrast_positives = True
    loss.gather_across_devices, loss.must_retokenize = False, False
    loss.similarity_fct = torch.nn.CosineSimilarity(dim=-1)
    loss.cross_entropy_loss = torch.nn.CrossEntropyLoss()

    def embed(module, features):
        return [module.columns[int(f["column"])] for f in features]

    peer_module.embed_columns = embed
    ours.embed_columns = embed
    return loss


def make_step(device: str, provider: str, loss: str, batch: int):
    from ...integrations import lightly as lightly_ours
    from ...integrations import open_clip as open_clip_ours
    from ...integrations import pytorch_metric_learning as pml_ours
    from ...integrations import sentence_transformers as st_ours

    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, unit=False):
        x = torch.randn(*shape, generator=generator)
        return (F.normalize(x, dim=-1) if unit else x).to(device).requires_grad_()

    family, name = loss.split(".")
    if family == "open_clip":
        module = _open_clip_peer() if provider == "peer" else open_clip_ours
        loss_fn = getattr(module, name)()
        tensors = [leaf(batch, DIM, unit=True), leaf(batch, DIM, unit=True), torch.tensor(10.0, requires_grad=True)]
        if name == "SigLipLoss":
            tensors.append(torch.tensor(-10.0, requires_grad=True))
        call = lambda: loss_fn(*tensors)  # noqa: E731
    elif family == "st":
        columns = [leaf(batch, DIM) for _ in range(2)]
        features = [{"column": torch.tensor(i)} for i in range(2)]
        if name == "GISTEmbedLoss":
            loss_fn = _gist(provider, columns)
        else:
            from sentence_transformers.sentence_transformer import losses as st_losses

            cls = getattr(st_losses if provider == "peer" else st_ours, name)
            loss_fn = cls(_FixedColumns(columns))
        tensors = columns
        call = lambda: loss_fn(features, None)  # noqa: E731
    elif family == "pml":
        from pytorch_metric_learning import losses as pml_losses

        loss_fn = getattr(pml_losses if provider == "peer" else pml_ours, name)()
        embeddings = leaf(batch, DIM)
        labels = torch.arange(batch, device=device) // 2  # two views per sample (SimCLR-style pairs)
        tensors = [embeddings]
        call = lambda: loss_fn(embeddings, labels)  # noqa: E731
    elif family == "lightly":
        loss_fn = (_lightly_peer() if provider == "peer" else lightly_ours.NTXentLoss)()
        tensors = [leaf(batch, DIM), leaf(batch, DIM)]
        call = lambda: loss_fn(*tensors)  # noqa: E731
    else:
        raise ValueError(f"unknown loss {loss!r}")

    def step():
        for t in tensors:
            t.grad = None
        value = call()
        value.backward()
        step.extra["loss"] = round(float(value), 5)

    step.extra = {}
    return step


def make_cached_step(device: str, provider: str, batch: int, loss: str = "st.CachedMultipleNegativesRankingLoss",
                     seq_len: int = 32, chunk: int = 32):
    """CachedMultipleNegativesRankingLoss (peer) vs fastcl's, same SentenceTransformer (tiny BERT)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from ...integrations import sentence_transformers as st_ours
    from .grad_cache import sentence_pairs, tiny_bert_dir

    path = tiny_bert_dir()
    torch.manual_seed(0)
    model = SentenceTransformer(path, device=device, local_files_only=True)
    model.train()
    anchors, positives = sentence_pairs(batch, seq_len, model[0].auto_model.config.vocab_size)
    cls = CachedMultipleNegativesRankingLoss if provider == "peer" else st_ours.CachedMultipleNegativesRankingLoss
    loss_fn = cls(model, scale=20.0, mini_batch_size=chunk)

    def step():
        model.zero_grad(set_to_none=True)
        value = loss_fn([anchors, positives], None)
        value.backward()
        step.extra["loss"] = round(float(value), 5)

    step.extra = {"encoder": "tiny BERT", "seq_len": seq_len, "chunk": chunk}
    return step


def _peer_available(loss: str):
    try:
        if loss.startswith("open_clip"):
            _open_clip_peer()
        elif loss.startswith("lightly"):
            _lightly_peer()
        elif loss.startswith("pml"):
            import pytorch_metric_learning  # noqa: F401
        else:
            import sentence_transformers  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"peer unavailable: {error}"[:100]
    return None


def cases(device: str, full: bool):
    batches = [1024, 4096, 8192]
    memory = _available_bytes(device)
    out = []
    for loss in LOSSES:
        unavailable = _peer_available(loss)
        sizes = batches
        if loss == "pml.NTXentLoss":
            sizes = [256, 512] + batches
        elif loss == "st.GISTEmbedLoss":  # the peer stops at ~1024; ours on the segment driver
            sizes = [256, 512, 1024, 4096] if not full else [256, 512] + batches  # takes minutes at 8192
        for batch in sizes:
            for provider in PROVIDERS:
                skip = unavailable if provider == "peer" else None
                estimate, what = PEER_MEMORY[loss]
                if provider == "peer" and skip is None and estimate(batch) > 0.4 * memory:
                    skip = f"out of memory (estimated, not run): needs ~{estimate(batch) / 2**30:.0f} GiB ({what})"
                out.append(Case(SUITE, provider, MODULE, "make_step", {"loss": loss, "batch": batch}, x=batch,
                                skip=skip, repeats=2 if batch < 8192 else 1))
    for batch in ([256] if not full else [256, 512, 1024]):
        for provider in PROVIDERS:
            out.append(Case(SUITE, provider, MODULE, "make_cached_step",
                            {"loss": "st.CachedMultipleNegativesRankingLoss", "batch": batch}, x=batch, repeats=1))
    return out


def _largest_batch(points):
    """Largest B with peak <= BUDGET_MB, from a power law through the two largest (B, peak MB)."""
    points = sorted((b, p) for b, p in points if p and p > 0)
    if not points:
        return None
    if len(points) == 1:
        (b1, p1), exponent = points[0], 2.0
    else:
        (b0, p0), (b1, p1) = points[-2], points[-1]
        exponent = max(0.5, math.log(p1 / p0) / math.log(b1 / b0)) if p1 > p0 else 1.0
    return int(b1 * (BUDGET_MB / p1) ** (1.0 / exponent))


def summarize(rows, device):
    """Per loss: time and memory of fastcl vs its peer at the largest batch both ran, and the
    largest batch each fits in 4 GB (estimated)."""
    lines = []
    losses = sorted({m.params["loss"] for m in rows})
    for loss in losses:
        ok = {(m.provider, m.params["batch"]): m for m in rows if m.params["loss"] == loss and m.status == "ok"}
        shared = [b for (p, b) in ok if p == "fastcl" and ("peer", b) in ok]
        text = f"{loss}:"
        if shared:
            batch = max(shared)
            ours, peer = ok[("fastcl", batch)], ok[("peer", batch)]
            text += (f" B={batch} time {ours.time_ms / peer.time_ms:.2f}x peer, peak memory "
                     f"{ours.peak_mb / max(peer.peak_mb, 1e-9):.3f}x peer ({ours.peak_mb:.0f} vs {peer.peak_mb:.0f} MB)")
        failed = sorted({b for m in rows if m.params["loss"] == loss and m.provider == "peer" and m.status != "ok"
                         for b in [m.params["batch"]]})
        if failed:
            text += f"; peer did not run at B={failed}"
        fits = {}
        for provider in PROVIDERS:
            points = [(b, m.peak_mb) for (p, b), m in ok.items() if p == provider]
            fits[provider] = _largest_batch(points)
        text += "; largest batch in 4 GB (est.): " + ", ".join(f"{p} ~{fits[p]}" for p in PROVIDERS if fits[p])
        lines.append(text)
    return "\n".join(lines)
