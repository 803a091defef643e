"""The canonical graph form: capture (tracing, ATen lowering, functionalisation, metadata resolution), the
operator tables, graph mutation, input variants, shape guards, and the region types and node metadata keys
that every later tier reads.

May import: fxrebirth.errors, fxrebirth.equivalence.
"""
