"""``sd35 serve``: the native job, OpenAI Images and A1111 APIs over one durable job queue.

:func:`~sd35.server.app.create_app` builds the FastAPI app around an :class:`~sd35.server.engine.Engine`
(the one owner of the model); :mod:`sd35.cli.serve` loads a model and runs it with uvicorn, or on Ray Serve
replicas that share one job queue (:mod:`sd35.server.ray_app`).
"""
