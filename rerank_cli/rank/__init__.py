"""Ranking scored rows: top-k per query and TREC runs (`ranking`), loading runs and qrels (`runs`),
`rerank eval`'s metrics (`evaluation`) and its tables (`report`). Scores nothing."""
