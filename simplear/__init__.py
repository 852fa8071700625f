"""SimpleAR on Ray: the library every stage shares (workflow engine, vocabulary, model, tokenizers, sampler)."""

__version__ = "0.1.0"
