"""Model compression for ViT segmenters: token reduction (ToMe, ALGM) that unmerges to the full grid,
so a compressed segmenter still returns logits (B, K, H, W).

``merging`` holds the methods as pure tensor functions; ``tome`` and ``algm`` install them on the
hooks of ``models.vit`` (``Block.token_reducer``); ``reducers`` is the wiring they share.
"""
