"""Models: text adapter, LLM text encoder, vision towers, LLM2CLIPModel."""
