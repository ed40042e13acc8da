"""Tiny random models built from explicit configs (offline, fast, exact) and shared helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TEXT = ("The quick brown fox jumps over the lazy dog. Heathrow airport is located in the city of London. "
        "The keys to the cabinet are on the table. 1, 1, 1, 1. The nurse said that she was tired. "
        "The doctor said that he was late. What is your name? ") * 4

PROMPTS = ["The quick brown fox", "Heathrow airport is located in the city of", "1, 1, 1,",
           "The keys to the cabinet are", "What is your name?", "The nurse said that"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the dequantized SmolLM2 in one cache for the whole session (the user's if it exists)."""
    os.environ.setdefault("STRATASCOPE_CACHE", str(Path.home() / ".cache" / "stratascope"))


def _bpe_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _seq2seq_tokenizer(vocab_size: int = 300):
    """A byte-level BPE with <pad> 0, </s> 1, <s> 2 that ends every text with </s>, as T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator([TEXT], trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                max_position_embeddings=128, rotary_pct=0.5, **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=128, type_vocab_size=2, **common)
    seq2seq = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "t5":  # gated MLP and tied embeddings as in Flan-T5: the LM head rescales by d_model**-0.5
        return tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
                           decoder_start_token_id=0, relative_attention_num_buckets=8, **seq2seq)
    if family == "bart":  # scaled embeddings and a random final_logits_bias, so the readout must apply both
        return tf.BartConfig(d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                             max_position_embeddings=128, scale_embedding=True, decoder_start_token_id=1,
                             forced_eos_token_id=None, **seq2seq)
    raise ValueError(family)


FAMILIES = ("gpt2", "llama", "gpt_neox", "bert")
SEQ2SEQ = ("t5", "bart")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny random model (with tokenizer) per family; each asserted to be tiny."""
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for family in FAMILIES:
        tok = _wordpiece_tokenizer() if family == "bert" else _bpe_tokenizer()
        torch.manual_seed(0)
        config = tiny_config(family, len(tok))
        cls = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
        model = cls.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params < 100_000, f"{family} test model has {n_params} parameters; it must stay tiny"
        path = root / family
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[family] = path
    for family in SEQ2SEQ:
        tok = _seq2seq_tokenizer()
        torch.manual_seed(0)
        cls = tf.T5ForConditionalGeneration if family == "t5" else tf.BartForConditionalGeneration
        model = cls(tiny_config(family, len(tok)))
        if family == "bart":  # zeros after init; random here so that a readout without it fails
            model.final_logits_bias.normal_(0, 0.5)
        assert sum(p.numel() for p in model.parameters()) < 100_000, f"{family} test model must stay tiny"
        path = root / family
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[family] = path
    return dirs


def load_reference(path, attn="eager"):
    """The same tiny model loaded directly with transformers, for independent comparisons."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(path)
    if config.is_encoder_decoder:
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation=attn).eval()
        return model, tf.AutoTokenizer.from_pretrained(path)
    cls = tf.AutoModel if config.model_type == "bert" else tf.AutoModelForCausalLM
    model = cls.from_pretrained(path, attn_implementation=attn).eval()
    return model, tf.AutoTokenizer.from_pretrained(path)


def fail_chunk_write(monkeypatch, array: str, nth: int, error: OSError) -> None:
    """Make the capture's nth chunk file of `array` fail to be written with `error`, at the one
    function every chunk file goes through (whether zarr or the capture's direct writes wrote it)."""
    from stratascope.capture import durable

    real, calls = durable._put, {"n": 0}

    def failing(path, parts, flush):
        if f"/{array}/c/" in str(path):
            calls["n"] += 1
            if calls["n"] == nth:
                raise error
        return real(path, parts, flush)

    monkeypatch.setattr(durable, "_put", failing)
