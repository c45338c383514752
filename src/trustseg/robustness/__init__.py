"""How a model breaks: ImageNet-C style corruptions and the clean-vs-corrupted benchmark."""
