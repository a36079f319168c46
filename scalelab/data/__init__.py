"""Data: the embedded synthetic world, task generators, user corpora, token shards and the loader."""
