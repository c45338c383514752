"""Model compression for ViT segmenters: token reduction (ToMe, ALGM) that unmerges to the full grid,
so a compressed segmenter still returns logits (B, K, H, W), and structural pruning of heads and MLP
units into physically smaller layers.

``merging`` holds the token methods as pure tensor functions; ``tome`` and ``algm`` install them on
the hooks of ``models.vit`` (``Block.token_reducer``); ``reducers`` is the wiring they share; ``prune``
ranks and cuts; ``spec`` parses the CLI's method specs and ``apply`` turns them into checkpoints.
"""
