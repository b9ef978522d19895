"""Reports over a run directory: the HTML/Markdown report, plots, the cost ledger, outcome statistics.

Everything here renders from files a run wrote (``docs/report.md`` lists them); the sandbox's
ground truth arrives as ``truth.json`` rather than by calling the gold.
"""
