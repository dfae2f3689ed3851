"""Apps on top of both runtimes: the benchmark (`bench`), which runs every mode of the
single-process engine and the pipeline on one model. The command line is `streamer.cli`."""
