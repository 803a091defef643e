"""The paper's experiment: its networks, embedded data, the default teacher and the main job that trains,
merges and reports.

May import: fxrebirth.errors, fxrebirth.equivalence, fxrebirth.graph, fxrebirth.rewrite, fxrebirth.passes, fxrebirth.measure, fxrebirth.retraining, fxrebirth.frontends.
"""
