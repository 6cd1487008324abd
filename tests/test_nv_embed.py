"""NV-Embed-style embedder on tiny random backbones built here (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fastcl.models import BidirectionalEmbedder, format_query, padding_mask_4d  # noqa: E402
from fastcl.ops.latent_attention import naive  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "Instruct", ":", "Query", "find", "retrieve", "animals", "the", "a",
         "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "?", ".", "what", "is", "it"]
HIDDEN = 32


def _tokenizer(bert_style: bool = False):
    """A word-level fast tokenizer; ``bert_style``: "[BOS] text [EOS]" added by the tokenizer
    itself (as BERT's [CLS] ... [SEP]) and no eos_token declared."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    template = "[BOS] $A [EOS]" if bert_style else "[BOS] $A"
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    names = dict(bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]")
    if bert_style:
        names["additional_special_tokens"] = ["[EOS]"]
    else:
        names["eos_token"] = "[EOS]"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names)


def _decoder(family: str, attn_implementation: str):
    torch.manual_seed(0)
    common = dict(vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaModel),
        "mistral": (transformers.MistralConfig, transformers.MistralModel),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model),
    }[family]
    config = config_class(**common)
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _embedder(backbone, **kwargs):
    torch.manual_seed(1)
    return BidirectionalEmbedder(backbone, _tokenizer(), num_latents=6, num_heads=2, head_dim=8, ff_mult=2, **kwargs)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_bidirectional_backbone_attends_forward_causal_original_does_not(family, attn_implementation):
    ids = torch.tensor([[2, 10, 12, 14, 15, 10, 16, 3]])
    changed = ids.clone()
    changed[0, 6] = 13  # a later token
    ones = torch.ones_like(ids)
    original = _decoder(family, attn_implementation)
    with torch.no_grad():
        before = original(input_ids=ids, attention_mask=ones).last_hidden_state
        after = original(input_ids=changed, attention_mask=ones).last_hidden_state
    torch.testing.assert_close(after[:, :6], before[:, :6])  # causal: earlier tokens cannot see token 6
    assert not torch.allclose(after[:, 6], before[:, 6])

    embedder = _embedder(_decoder(family, attn_implementation))
    backbone = embedder.backbone
    with torch.no_grad():
        mask = padding_mask_4d(ones, torch.float32)
        before = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        after = backbone(input_ids=changed, attention_mask=mask).last_hidden_state
    earlier_change = (after[0, :6] - before[0, :6]).abs().amax(dim=-1)
    assert (earlier_change > 1e-4).all(), f"earlier tokens must see token 6: {earlier_change.tolist()}"

    # Padding keys stay masked: trailing pad tokens change nothing for the real tokens.
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([ones, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        with_pad = backbone(input_ids=padded, attention_mask=padding_mask_4d(padded_mask, torch.float32)).last_hidden_state
    torch.testing.assert_close(with_pad[:, :8], before, atol=1e-5, rtol=1e-5)


def test_tokenize_template_eos_and_instruction_excluded_from_pool_mask():
    embedder = _embedder(_decoder("llama", "sdpa"))
    assert format_query("the cat sat", "find animals") == "Instruct: find animals\nQuery: the cat sat"
    batch = embedder.tokenize(["the cat sat", "a dog"], instruction="find animals")
    tokens = [WORDS[i] for i in batch["input_ids"][0].tolist()]
    assert tokens == ["[BOS]", "Instruct", ":", "find", "animals", "Query", ":", "the", "cat", "sat", "[EOS]"]
    assert batch["pool_mask"][0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["attention_mask"][1].tolist() == [1] * 10 + [0]  # right padding
    assert batch["pool_mask"][1].tolist() == [0] * 7 + [1, 1, 1, 0]
    plain = embedder.tokenize(["the cat sat"])
    assert [WORDS[i] for i in plain["input_ids"][0].tolist()] == ["[BOS]", "the", "cat", "sat", "[EOS]"]
    assert plain["pool_mask"][0].tolist() == [1] * 5


def test_bert_style_tokenizer_trailing_separator_is_pooled_and_nothing_appended():
    embedder = BidirectionalEmbedder(_bert(), _tokenizer(bert_style=True), num_latents=4, num_heads=2)
    batch = embedder.tokenize(["the cat"], instruction="find animals")
    tokens = [WORDS[i] for i in batch["input_ids"][0].tolist()]
    assert tokens == ["[BOS]", "Instruct", ":", "find", "animals", "Query", ":", "the", "cat", "[EOS]"]
    assert batch["pool_mask"][0].tolist() == [0] * 7 + [1, 1, 1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_encode_pools_text_tokens_only_and_instruction_still_attends(family):
    embedder = _embedder(_decoder(family, "sdpa"))
    texts = ["the cat sat on the mat", "a dog ran far away"]
    queries = embedder.encode(texts, instruction="find animals")
    assert queries.shape == (2, HIDDEN)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(2))

    # The same numbers by hand: bidirectional backbone, then the naive pooling over the text tokens only.
    batch = embedder.tokenize(texts, instruction="find animals")
    with torch.no_grad():
        hidden = embedder.backbone(input_ids=batch["input_ids"],
                                   attention_mask=padding_mask_4d(batch["attention_mask"], torch.float32)).last_hidden_state
        expected = naive.latent_attention_pool(hidden, batch["pool_mask"], *embedder.pooling.flat_parameters(),
                                               num_heads=2)
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=1e-5)

    # Instruction tokens are attended to (the text tokens see them), so another instruction moves the embedding.
    other = embedder.encode(texts, instruction="retrieve what is it")
    assert (queries - other).abs().max() > 1e-4


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_batched_encoding_equals_one_by_one(backbone):
    """Padding inside a batch changes nothing (padding mask correct on both decoder and encoder)."""
    model = _decoder("llama", "sdpa") if backbone == "llama" else _bert()
    embedder = _embedder(model)
    texts = ["the cat", "a dog ran far away on the mat .", "what is it ?"]
    together = embedder.encode(texts, instruction="find animals")
    alone = torch.cat([embedder.encode([t], instruction="find animals") for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(3))


def test_training_step_reaches_backbone_and_pooling():
    embedder = _embedder(_decoder("mistral", "sdpa"))
    embedder.train()
    batch = embedder.tokenize(["the cat sat", "a dog ran"], instruction="find animals")
    embedding = embedder(**batch)
    (embedding[0] @ embedding[1]).backward()
    assert embedder.pooling.latents.grad is not None and embedder.pooling.latents.grad.abs().max() > 0
    assert embedder.backbone.embed_tokens.weight.grad.abs().max() > 0


def test_errors():
    embedder = _embedder(_decoder("llama", "sdpa"))
    with pytest.raises(TypeError, match="texts must be a non-empty list of strings"):
        embedder.tokenize([])
    from fastcl import LatentAttentionPooling

    with pytest.raises(ValueError, match="pooling.hidden_size=16"):
        BidirectionalEmbedder(_decoder("llama", "sdpa"), _tokenizer(), pooling=LatentAttentionPooling(16, num_latents=2))
