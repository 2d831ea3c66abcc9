"""Run reports: an HTML page with PNG figures (results with CIs, synthetic-count sweep, examples, curves)."""
