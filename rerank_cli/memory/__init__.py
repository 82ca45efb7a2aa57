"""Device memory: token-budget batches with out-of-memory back-off (`batching`), the first budget and the
probe cache (`budget`), `rerank probe-memory` (`probe`), and the estimate from a config alone (`estimate`)."""
