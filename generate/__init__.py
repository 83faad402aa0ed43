"""generate: from a dependency graph to a reviewed suite of fault tests, and its exports.

planner.run(graph, options) / planner.regenerate(graph, old, options) make a Suite;
suitefile.dump_suite / load_suite write and strictly read suite.yaml; export.export(suite,
format) gives Chaos Mesh, Chaos Toolkit or pytest; diff.diff_graphs / diff_suites compare scans.
"""
