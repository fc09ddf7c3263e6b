"""Tiny stand-ins for the real model, built at test time in seconds: a BPE tokenizer trained on a
few sentences and a randomly initialised 2-layer LLaMA. They go through the very same code paths
(import, export, serving) as SmolLM2."""

from __future__ import annotations

from pathlib import Path

TINY_CORPUS = [
    "Toy Story (1995) Adventure Animation Children Comedy Fantasy",
    "Senior data engineer at Acme, skills: python, spark, kafka, distributed systems",
    "We are hiring machine learning engineers to build feed ranking and retrieval at scale.",
    "<post><format>article</format><author><name>Ada Lovelace</name></author><text>hello</text></post>",
    "<member><headline>Staff engineer</headline><skills>rust, go</skills><history></history></member>",
    "The quick brown fox jumps over the lazy dog 0123456789 percentile views likes comments shares",
]


def make_tokenizer(vocab_size: int = 512):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    return tok


def make_tiny_checkpoint(out_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a Hugging Face checkpoint (LlamaModel + fast tokenizer) to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = LlamaModel(config).eval()
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def make_tiny_ranker(out_dir: Path, content_dim: int, seed: int = 0) -> Path:
    """A randomly initialised GR ranker with the served feature set, its id embeddings random too
    (as if trained) for the posts the bad-input and pipeline tests index (ids 500..999)."""
    import torch

    from feedserve.rank.data import FEATURES
    from feedserve.rank.model import GenerativeRanker, RankerConfig

    torch.manual_seed(seed)
    config = RankerConfig(
        content_dim=content_dim, d_model=16, n_heads=2, n_layers=1, max_history=20, id_buckets=1024, features=FEATURES
    )
    model = GenerativeRanker(config, known_ids=torch.arange(500, 1000))
    torch.nn.init.normal_(model.ids.weight, std=0.5)
    model.save(out_dir)
    return out_dir
