"""Plain-Python entry points behind each CLI command: config dataclass in, result dataclass out."""
