"""fxrebirth's rewrite rules, one module per family (installed as ``fxrebirth.passes``).

Each family module opens with the identity it applies and ends with a ``rules()`` function returning
its rules in order. Nothing registers itself on import: pipelines are built from these lists.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite.
"""

from . import affine, batchnorm, branches, cleanup, conv_chain, inception, pooling, streamline

__all__ = ["affine", "batchnorm", "branches", "cleanup", "conv_chain", "inception", "pooling", "streamline"]
