"""fxrebirth's rewrite rules, one module per family (installed as ``fxrebirth.passes``).

Two kinds of module, one protocol each:

* **Exact rules** (affine, batchnorm, branches, cleanup, conv_chain, lrn, pooling): each opens with the
  identities it applies and ends with a ``rules()`` function returning its rules in order. Nothing
  registers itself on import: pipelines are built from these lists.
* **Marking passes** (streamline, inception): each has one ``mark_<family>(gm, **options) ->
  list[Region]`` that finds the non-linear regions only retraining can merge, records them in
  ``gm.meta`` (:func:`fxrebirth.graph.regions.record`) and returns them; it never changes the graph.
  :func:`fxrebirth.plan` calls them, streamline first.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite.
"""

from . import affine, batchnorm, branches, cleanup, conv_chain, inception, lrn, pooling, streamline

__all__ = ["affine", "batchnorm", "branches", "cleanup", "conv_chain", "inception", "lrn", "pooling", "streamline"]
