"""Tiny random configs of every supported family (hidden 32, 2-4 layers, 4 heads, vocab 99), built in code: no download."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "deberta-v2", "mpnet", "modernbert")
SDPA_FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "modernbert")

_COMMON = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64
)
_EXTRA = {
    "bert": {},
    "roberta": dict(pad_token_id=1),
    "xlm-roberta": dict(pad_token_id=1),
    "electra": dict(embedding_size=16),
    "distilbert": dict(dim=32, n_layers=4, n_heads=4, hidden_dim=37),
    "albert": dict(embedding_size=16, num_hidden_groups=2, inner_group_num=1),
    "deberta-v2": dict(
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        conv_kernel_size=3,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        type_vocab_size=0,
    ),
    "mpnet": dict(pad_token_id=1),
    # A window of 4 (2 each side) so that sliding layers really differ from full ones on 7-12 token inputs.
    "modernbert": dict(
        global_attn_every_n_layers=2, local_attention=4, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
        classifier_pooling="mean",
    ),
}


def tiny_config(family: str, num_labels: int = 3, **overrides):
    kwargs = dict(_COMMON)
    if family == "distilbert":
        kwargs = dict(vocab_size=99, max_position_embeddings=64)
    kwargs.update(_EXTRA[family])
    kwargs.update(overrides)
    return AutoConfig.for_model(family, num_labels=num_labels, **kwargs)


def tiny_stock(family: str, num_labels: int = 3, attn_implementation: str | None = None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, num_labels=num_labels, **overrides)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForSequenceClassification.from_config(config, **kwargs).eval()


def padded_batch(lengths=(9, 6, 3, 12), vocab: int = 99, seed: int = 0, first_id: int = 2):
    """input_ids and a right-padded 0/1 attention mask; token ids avoid the special ids 0-4, first token is `first_id`."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    input_ids = torch.randint(5, vocab, (len(lengths), seq_len), generator=generator)
    input_ids[:, 0] = first_id
    attention_mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = 0
    return input_ids, attention_mask


def stock_and_pyramid(family: str, attn_implementation: str | None = None, num_labels: int = 3, seed: int = 0, **options):
    """(stock classifier, Magic Pyramid classifier converted from it), both in eval mode; `options` are config fields."""
    from hf_magicpyramid import MagicPyramidForSequenceClassification

    stock = tiny_stock(family, num_labels=num_labels, attn_implementation=attn_implementation, seed=seed)
    return stock, MagicPyramidForSequenceClassification.from_backbone(stock, **options).eval()


def tiny_pyramid(family: str, attn_implementation: str | None = None, num_labels: int = 3, seed: int = 0, **options):
    """A Magic Pyramid classifier (eval mode) converted from `tiny_stock(family, ...)`; `options` are config fields."""
    return stock_and_pyramid(family, attn_implementation, num_labels, seed, **options)[1]


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]  # the tiny vocab (99), as words


def word_tokenizer(folder: Path, words: int = 94):
    """A word-level BertTokenizer over `[PAD] [UNK] [CLS] [SEP] [MASK] w0 ... w{words-1}`, its vocab.txt in `folder`."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS[: 5 + words]) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False)


def make_tiny_backbone(path: Path, **overrides) -> Path:
    """A saved tiny bare BERT encoder (no head: stage 1 of the recipe trains one) with its word-level tokenizer."""
    from transformers import AutoModel

    word_tokenizer(path).save_pretrained(str(path))
    torch.manual_seed(0)
    config = tiny_config("bert", num_labels=2, **overrides)
    config.architectures = None
    AutoModel.from_config(config).save_pretrained(str(path))
    return path


def sharpen_exits(model, std: float = 2.0, seed: int = 0):
    """Random but confident exit heads, so that exits fire at different layers for different inputs. Returns model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.exits.values():
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=generator) * std)
    return model
