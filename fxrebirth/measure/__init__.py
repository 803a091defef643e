"""Measurement: the runtime registry (:mod:`fxrebirth.measure.runtimes`, one record per runtime, which
everything naming a runtime reads), the interleaved timer every speed figure uses, the runners and exports
the records name, the speed table and its memory subprocess, and the device bundles.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite.
"""
