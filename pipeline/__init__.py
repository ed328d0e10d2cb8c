"""Apache Beam jobs of balancebeam: annotate, balance, resample, report.

Transforms stay thin: they move records and call into `solvers/` and the annotators.
"""
