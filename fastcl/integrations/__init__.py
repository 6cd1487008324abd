"""Drop-in replacements for the losses of the libraries users already train with.

One module per peer, imported only when used (the peer stays an optional extra; importing
``fastcl.integrations`` imports none of them)::

    from fastcl.integrations.open_clip import ClipLoss, SigLipLoss, patch_open_clip
    from fastcl.integrations.sentence_transformers import (MultipleNegativesRankingLoss,
        MultipleNegativesSymmetricRankingLoss, CachedMultipleNegativesRankingLoss, GISTEmbedLoss)
    from fastcl.integrations.pytorch_metric_learning import NTXentLoss, SupConLoss
    from fastcl.integrations.lightly import NTXentLoss
    from fastcl.integrations.transformers import compute_loss_func, GradCacheTrainerMixin

Each class has its peer's name, constructor and call; fastcl's own options come after the
peer's, keyword-only (the open_clip and lightly losses' ``distributed_mode``: "auto", "gather"
or "ring", see :mod:`fastcl.distributed`). The configurations fastcl fuses run on
its kernels; any other (a custom similarity function, a PML reducer or distance, ...) runs
through the peer's own code, so swapping the import never loses a capability. The path taken
is logged at DEBUG level on the ``fastcl.integrations`` logger.
"""
import logging

log = logging.getLogger("fastcl.integrations")
