"""`--engine ray`: the run on Ray Data (`run`), the scoring actors (`actor`), reading and writing (`io`)
and reaching and sizing the cluster (`cluster`)."""
