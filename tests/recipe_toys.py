"""Helpers of the recipe and pipeline tests.

Toy passes: cheap, deterministic, and registered only inside a test (``toys`` fixture), so the
pipeline's mechanics are tested whatever real passes exist. ``recipe_copy``: recipes/ copied beside
freshly written tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import Field
from tiny import make_recipe_models

from squeeze.compress.errors import SqueezeError
from squeeze.compress.passes import REGISTRY, Pass, PassConfig


class ScaleConfig(PassConfig):
    factor: float = Field(1.0, gt=0, le=10)
    noise: float = Field(0.0, ge=0, le=1)  # seeded by ctx.generator: tests that seeds are stable
    fail: bool = False  # raise a SqueezeError in apply (a user mistake found at run time)


class ToyScale(Pass):
    """Scale every attention output projection by ``factor`` (+ seeded noise); shapes unchanged."""

    name: ClassVar[str] = "toy_scale"
    Config: ClassVar[type[PassConfig]] = ScaleConfig
    calls: ClassVar[int] = 0

    def apply(self, models, ctx):
        type(self).calls += 1
        if self.config.fail:
            raise SqueezeError("toy_scale: asked to fail")
        model = models[0]
        g = ctx.generator
        layers = ctx.family.layers(model)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                w = ctx.family.linear_weight(ctx.family.role(layer, "attn_out"))
                w.mul_(self.config.factor)
                if self.config.noise:
                    w.add_(torch.randn(w.shape, generator=g) * self.config.noise)
                ctx.step("toy layers", i + 1, len(layers))
        ctx.result["factor"] = self.config.factor
        return model

    def restructure(self, model, edit, family):
        return model


class CalConfig(PassConfig):
    bits: int = Field(8, ge=2, le=8)


class ToyCal(Pass):
    """Reads calibration batches (so it needs calibration data) and changes nothing."""

    name: ClassVar[str] = "toy_cal"
    Config: ClassVar[type[PassConfig]] = CalConfig
    needs_calibration: ClassVar[bool] = True

    def apply(self, models, ctx):
        batches = ctx.calib_batches()
        ctx.metrics["calib_batches"] = len(batches)
        return models[0]

    def restructure(self, model, edit, family):
        return model


TOYS = {"toy_scale": ToyScale, "toy_cal": ToyCal}


@pytest.fixture
def toys(monkeypatch):
    """Register the toy passes for one test."""
    for name, cls in TOYS.items():
        monkeypatch.setitem(REGISTRY, name, cls)
    ToyScale.calls = 0
    return TOYS


RECIPES = Path(__file__).parents[1] / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


@pytest.fixture(scope="session")
def recipe_copy(tmp_path_factory) -> Path:
    """recipes/ copied beside freshly written tiny models (what `python tests/tiny.py recipes/tiny` makes)."""
    root = tmp_path_factory.mktemp("recipes") / "recipes"
    shutil.copytree(RECIPES, root, ignore=shutil.ignore_patterns("tiny"))
    make_recipe_models(root / "tiny")
    return root
