"""Annotators of balancebeam: what a caption or an image suggests about attributes and concepts.

`text` (lexicon matching, the default), `image` (open_clip zero-shot) and `combine` (policies).
"""
