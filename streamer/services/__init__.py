"""Services on the one engine interface (`streamer.interface.EngineLike`): the ZeroMQ server and
its client library (`server`, `client`), and the pipeline served (`pipeline`). They know engines
only through that interface; neither runtime imports them."""
