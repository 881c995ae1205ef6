"""Tiny models of the families added for issue 14 (roberta, xlm-roberta, mpnet, distilbert, gemma, phi3),
built offline from configs with fixed seeds, written as Hugging Face folders like tests/tiny.py."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from tiny import VOCAB, write_tokenizer

#: name -> (tokenizer flavour of tests/tiny.py, architecture)
MORE = {
    "roberta": ("bert", "RobertaModel"),
    "xlm-roberta": ("bert", "XLMRobertaModel"),
    "mpnet": ("bert", "MPNetModel"),
    "distilbert": ("bert", "DistilBertModel"),
    "gemma": ("llama", "GemmaForCausalLM"),
    "phi3": ("llama", "Phi3ForCausalLM"),
}


def tiny_config_more(name: str, layers: int = 4, hidden: int = 32):
    common = dict(vocab_size=VOCAB, pad_token_id=0, architectures=[MORE[name][1]])
    enc = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=hidden * 2)
    if name == "roberta":
        return T.RobertaConfig(**common, **enc, max_position_embeddings=258, bos_token_id=2, eos_token_id=3)
    if name == "xlm-roberta":
        return T.XLMRobertaConfig(**common, **enc, max_position_embeddings=258, bos_token_id=2, eos_token_id=3)
    if name == "mpnet":
        return T.MPNetConfig(**common, **enc, max_position_embeddings=258, bos_token_id=2, eos_token_id=3)
    if name == "distilbert":
        return T.DistilBertConfig(
            **common, dim=hidden, n_layers=layers, n_heads=4, hidden_dim=hidden * 2, max_position_embeddings=256
        )
    if name == "gemma":
        return T.GemmaConfig(
            **common,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            intermediate_size=hidden * 2,
            max_position_embeddings=256,
            bos_token_id=2,
            eos_token_id=3,
        )
    if name == "phi3":  # grouped-query attention: the fused qkv_proj's k and v are narrower than q
        return T.Phi3Config(
            **common,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=hidden * 2,
            max_position_embeddings=256,
            original_max_position_embeddings=256,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
        )
    raise ValueError(name)


def build_tiny_more(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config_more(name, **kw)
    model = getattr(T, cfg.architectures[0])._from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, as in tests/tiny.py
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_tiny_more(name: str, folder: str | Path, seed: int = 0, **kw) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_more(name, seed=seed, **kw).save_pretrained(str(folder))
    write_tokenizer(MORE[name][0], folder)
    return folder
