"""Capture: corpus reading, batching, hooks, the writer (see runner.capture).

Kept free of imports so that `import stratascope` stays light and `stratascope.capture`
remains the function, not this package.
"""
