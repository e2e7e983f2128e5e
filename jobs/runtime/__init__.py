"""What the entry points under ``jobs/`` share, grouped by concern.

Imports between the groups run one way: ``stages`` -> ``training`` -> ``config`` -> ``tracking``,
and ``service`` -> ``config`` -> ``tracking`` (tests/unit/test_import_graph.py checks it).
"""
