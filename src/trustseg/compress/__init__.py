"""Model compression: structural pruning and token reduction."""
