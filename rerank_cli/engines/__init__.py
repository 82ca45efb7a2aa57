"""Engines: the ways a run is executed. `inline` (one device, in process), `local` (a worker process per
device on this machine, resumable shards) and `ray` (a Ray cluster). Each reads, scores with the one
`Reranker` and writes through what `job` gives them all; no engine imports another."""
