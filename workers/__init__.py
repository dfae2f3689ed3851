"""Runtime B, the pipeline: separate processes over ZeroMQ (predictor, flash prefetch, compute).

`config` holds the settings and the plan, `launcher` starts and watches the stages, `remote` is
the front end's engine interface over them, `shm` the rows they share; each stage module has one
entry function, `run(spec)`. The single-process runtime is `streamer.engine`; neither imports
the other, and both stand on the core in `streamer/`.
"""
