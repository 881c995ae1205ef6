"""Tiny models of every family, built offline from configs with fixed seeds.

``make_tiny(name, folder)`` writes a Hugging Face folder (config, safetensors, and a small
BPE tokenizer trained on the built-in corpus for text families), the way a user's checkpoint
looks. Benchmarks import this too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T

VOCAB = 384
SPECIAL = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "llama": ["<pad>", "<unk>", "<s>", "</s>"],
    "gpt2": ["<|endoftext|>"],
}


def tiny_config(name: str, layers: int = 4, hidden: int = 32, **over):
    if name == "bert":
        cfg = T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=hidden * 2,
            max_position_embeddings=256,
            pad_token_id=0,
            architectures=["BertModel"],
        )
    elif name == "vit":
        cfg = T.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=hidden * 2,
            architectures=["ViTModel"],
        )
    elif name == "llama":
        cfg = T.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=hidden * 2,
            max_position_embeddings=256,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
        )
    elif name == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
            architectures=["GPT2LMHeadModel"],
        )
    else:
        raise ValueError(name)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny(name: str, seed: int = 0, **cfg_over):
    """A tiny model with non-trivial (seeded) weights, norms included."""
    torch.manual_seed(seed)
    cfg = tiny_config(name, **cfg_over)
    cls = getattr(T, cfg.architectures[0])
    model = cls._from_config(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial so invariants are real tests
        for _n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_tokenizer(name: str, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from squeeze.compress.calibration import builtin_corpus

    specials = SPECIAL[name]
    tok = Tokenizer(models.BPE(unk_token=specials[1] if len(specials) > 1 else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(builtin_corpus(), trainer)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256}
    if name == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
        cfg.update(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    elif name == "llama":
        cfg.update(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    else:
        cfg.update(pad_token="<|endoftext|>", eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def make_tiny(name: str, folder: str | Path, seed: int = 0, **cfg_over) -> Path:
    """Write a tiny Hugging Face checkpoint folder of family ``name``; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_tiny(name, seed=seed, **cfg_over)
    model.save_pretrained(str(folder))
    if name != "vit":
        write_tokenizer(name, folder)
    return folder


#: the folders the tiny recipes in recipes/ refer to (``model: tiny/bert`` beside the recipe):
#: one per family, plus a second llama / gpt2 (another seed, same tokenizer) to merge with.
RECIPE_MODELS = {
    "bert": ("bert", 0),
    "vit": ("vit", 0),
    "llama": ("llama", 0),
    "gpt2": ("gpt2", 0),
    "llama-b": ("llama", 1),
    "gpt2-b": ("gpt2", 1),
}


def make_recipe_models(folder: str | Path) -> Path:
    """Write the tiny models the recipes in recipes/ use into ``folder`` (normally recipes/tiny)."""
    folder = Path(folder)
    for sub, (name, seed) in RECIPE_MODELS.items():
        if not (folder / sub / "config.json").exists():
            make_tiny(name, folder / sub, seed=seed)
    return folder


if __name__ == "__main__":  # python tests/tiny.py recipes/tiny
    import sys

    target = make_recipe_models(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "recipes" / "tiny")
    print(f"tiny models written to {target}")
