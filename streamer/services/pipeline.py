"""The pipeline served: the launcher's stages (`workers.launcher.Pipeline`) behind the server.

    async with serve_pipeline(PipelineConfig(model="m", endpoint="ipc:///run/s/front.sock")) as p:
        ...  # clients connect to p.endpoint; p.stages, p.counts, p.engine for the embedder

The server binds once every stage is READY; leaving the block stops the server, then the stages.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio

from streamer.errors import first_error
from streamer.services.http import HttpApi
from streamer.services.scheduler import Scheduler
from streamer.services.server import Server, ServerSettings, default_endpoint
from workers.config import PipelineConfig, security_of
from workers.launcher import Pipeline


@contextlib.asynccontextmanager
async def serve_pipeline(
    config: PipelineConfig, processes: bool = True, api: HttpApi | None = None
) -> AsyncIterator[Pipeline]:
    """Launch the pipeline of `config` and serve it on `config.endpoint` (processes=False: the
    stages as tasks of this process, for small models and tests); `api`, an HTTP front end
    already serving, serves it too once the stages are ready."""
    try:
        async with Pipeline.launch(config, processes) as pipeline:
            settings = ServerSettings(
                config.endpoint or default_endpoint(),
                security_of(config),
                queue_size=config.queue_size,
                model_name=pipeline.plan.model.description,
                context=config.context,
            )
            scheduler = Scheduler(
                pipeline.engine, pipeline.tokenizer, settings.context, settings.queue_size
            )
            server = Server(None, pipeline.tokenizer, settings, scheduler=scheduler)
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                pipeline.endpoint = await tg.start(server.serve)
                if api is not None:
                    api.counts = pipeline.counts
                    api.attach(scheduler)
                try:
                    yield pipeline
                finally:
                    # A request waiting on a worker thread fails at once; then the server stops.
                    pipeline.engine.fail("the pipeline is shutting down")
                    tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # one clear error for the embedder, not a tree
        raise first_error(group) from None
