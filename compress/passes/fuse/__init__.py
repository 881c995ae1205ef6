"""Optimal-transport fusion (Transformer Fusion with Optimal Transport, ICLR 2024)."""

from squeeze.compress.passes.fuse.fuse import FuseConfig, FusePass, FuseResult

__all__ = ["FuseConfig", "FusePass", "FuseResult"]
