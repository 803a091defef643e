"""The entry points into the exact tier: the library call ``optimize``, the ``torch.compile`` backend and
``torch.export`` programs.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite, fxrebirth.passes, fxrebirth.measure.
"""
