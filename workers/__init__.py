"""Pipeline stage processes (predictor, flash prefetch, compute), one module each.

Each stage is a process with one entry function, `run(config)`, connected to the others over
ZeroMQ. The stages arrive with the pipeline issue; the single-process engine lives in `streamer`.
"""
