"""Data: the corpus build (corpus.py), token shards (shards.py) and the resumable loader (loader.py)."""
