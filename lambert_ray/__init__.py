"""lambert_ray: LlamBERT (LLM labels a subset, BERT classifies the corpus) on Ray."""

__version__ = "0.1.0"
