"""fxrebirth's rewrite rules, one module per family (installed as ``fxrebirth.passes``).

Two kinds of module, one protocol each:

* **Exact rules** (affine, batchnorm, branches, cleanup, conv_chain, lrn, pooling): each opens with the
  identities it applies and ends with a ``rules(phase=None)`` function returning its rules in order,
  grouped by the phases of the default pipeline (:data:`fxrebirth.rewrite.rules.PHASES`). Nothing
  registers itself on import: pipelines are built from these lists. :data:`EXACT` lists the families of
  :func:`fxrebirth.default_rules` (whole families, phase by phase); :data:`OPT_IN`, those whose rules a
  pipeline asks for by name (lrn: a lowering for runtimes without LRN).
* **Marking passes** (streamline, inception): each has one ``mark_<family>(gm, **options) ->
  list[Region]`` that finds the non-linear regions only retraining can merge, records them in
  ``gm.meta`` (:func:`fxrebirth.graph.regions.record`) and returns them; it never changes the graph.
  :func:`fxrebirth.plan` calls them, streamline first.
* **Depth compression** (depth, linearise): :func:`depth.find_segments` lists the overlapping candidate
  segments where removing activations makes a chain one convolution (nothing recorded, nothing changed);
  :func:`linearise.linearise` builds the student form of chosen ones and :func:`linearise.merge` merges
  them exactly, each merge verified.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite.
"""

from . import affine, batchnorm, branches, cleanup, conv_chain, depth, inception, linearise, lrn, pooling, streamline

EXACT = (cleanup, batchnorm, affine, pooling, conv_chain, branches)
"""The families of the default pipeline, in their order within each phase."""
OPT_IN = (lrn,)
"""Families of exact rules outside the default pipeline."""

__all__ = ["EXACT", "OPT_IN", "affine", "batchnorm", "branches", "cleanup", "conv_chain", "depth", "inception",
           "linearise", "lrn", "pooling", "streamline"]
