"""Measurement: the interleaved timer every speed figure uses, runtimes and exports to time, the speed
table and its memory subprocess.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite.
"""
