"""Many devices on one machine: the plan (`plan`), the shard loop and recovery (`run`), the worker
processes as the parent sees them (`pool`) and from inside (`worker`), the resumable work dir
(`workdir`) and the in-order merge of scored parts (`merge`)."""
