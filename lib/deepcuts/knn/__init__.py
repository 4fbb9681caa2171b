"""k-nearest-neighbour search of the catalogue: FAISS shard search, top-k merge, recall check,
index persistence (one module per concern, each with its own test), and the Spark runner
that drives them (``sharded``)."""
