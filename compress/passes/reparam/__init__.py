"""SLAB (ICML 2024): progressive LayerNorm -> RepBN with an exact fold, and simplified linear attention."""
