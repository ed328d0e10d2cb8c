"""Thin torch trainer and bias/quality evaluator for contrastive models on WebDataset shards.

Depends on neither Beam nor cvxpy: it only reads shards.
"""
