"""The tiny ViT on sklearn's 8x8 digits that the merge, fuse and reparam benchmarks train.

Patch 2, hidden 64, 3 layers, MLP 128 (any width with ``mlp``), trained from scratch with AdamW
and a one-cycle schedule; pixels normalised the way squeeze's image loader does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EPOCHS = 40
BATCH = 64
LR = 2e-3
VIT = dict(
    image_size=8,
    patch_size=2,
    num_channels=1,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    num_labels=10,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def digits():
    """(train x, train y, test x, test y); pixels scaled to [0, 1], shape (N, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    return train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=0)


def pixels(x: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] -> ViT pixel values, normalised like squeeze's image loader."""
    return ((torch.from_numpy(x)[:, None] - 0.5) / 0.5).contiguous()


def train(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    *,
    epochs: int = EPOCHS,
    mlp: int | None = None,
    frozen_embeddings: dict | None = None,
):
    """A tiny ViT classifier trained from scratch on (x, y); ``mlp`` overrides the MLP width;
    ``frozen_embeddings`` (a ViT embeddings state dict) is loaded and kept frozen."""
    import transformers as T

    torch.manual_seed(seed)
    shape = VIT if mlp is None else {**VIT, "intermediate_size": mlp}
    cfg = T.ViTConfig(
        **shape,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
        architectures=["ViTForImageClassification"],
    )
    model = T.ViTForImageClassification(cfg)
    if frozen_embeddings is not None:
        model.vit.embeddings.load_state_dict(frozen_embeddings)
        model.vit.embeddings.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.05)
    steps = epochs * -(-len(x) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    px, py = pixels(x), torch.from_numpy(y).long()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(px), generator=g)
        for i in range(0, len(px), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(pixel_values=px[idx]).logits, py[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def save_expert(model, folder: Path) -> Path:
    """The model and an 8x8 image processor, as a Hugging Face folder squeeze can read."""
    from transformers import ViTImageProcessor

    model.save_pretrained(str(folder))
    # squeeze's image loader hands the processor 0..255 pixels: rescale by 1/255, then (x - 0.5) / 0.5 as pixels()
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]).save_pretrained(str(folder))
    return folder


@torch.no_grad()
def logits_of(model, x: np.ndarray) -> torch.Tensor:
    return model(pixel_values=pixels(x)).logits


def accuracy(logits: torch.Tensor, y: np.ndarray) -> float:
    return float((logits.argmax(-1).numpy() == y).mean())
