"""Data: caption sources, image preprocessing, loaders, the built-in demo set, the embedding cache."""
