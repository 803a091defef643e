"""The exact-tier engine: the rule contract (pattern, check with a reason, rewrite through a context that
records and rolls back), the pipeline, float64 local and end-to-end verification, cost models, the report.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph.
"""
