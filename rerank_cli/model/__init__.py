"""The model: loading (`load`), the forward pass of one batch (`scorers`), the final-layer trim (`lean`),
pair encodings (`templates`), the dtype choice (`precision`), and the tiny local models that the tests,
the demo and the benchmarks build (`tiny`). Knows nothing of files, batching across windows or engines."""
