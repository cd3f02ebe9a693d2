"""Every private litserve name the server relies on, in one list (litserve 0.2.19).

litserve's public surface (LitAPI hooks, LitServer arguments, middlewares, callbacks) does
not cover deciding a request before it is queued, deadlines while it waits, a blocking batch
loop, or a bounded shutdown, so server/app.py and server/apis.py override or call the names
below. tests/test_litserve_private.py fails, naming the entry, when an installed litserve
lacks one of them, and when server/ starts using a private litserve name not listed here.
"""
PRIVATE_NAMES: dict[str, str] = {
    # module-level names imported by server/apis.py and server/app.py
    "litserve.loops.base._SENTINEL_VALUE": "the worker queue's stop marker",
    "litserve.loops.base._StopLoopError": "raised to end a worker loop",
    # LitServer methods overridden by RadioDiffServer (server/app.py)
    "litserve.server.LitServer._register_api_endpoints": "routes that validate in the HTTP process",
    "litserve.server.LitServer._register_internal_endpoints": "/health, /info, /metrics",
    "litserve.server.LitServer._register_middleware": "no gzip",
    "litserve.server.LitServer._init_manager": "SIGTERM-proof manager, shared worker info",
    "litserve.server.LitServer._perform_graceful_shutdown": "bounded drain, dead-worker stop",
    # LitServer members called
    "litserve.server.LitServer._get_request_queue": "the queue a handler submits to",
    "litserve.server.LitServer._inference_workers_config_for_api": "workers per endpoint",
    "litserve.server.LitServer._shutdown_event": "instance attribute: wakes the main thread",
    "litserve.server.LitServer._callback_runner": "instance attribute: ON_RESPONSE callbacks",
    # request handler members used by QueuedRequestHandler (server/app.py)
    "litserve.server.RegularRequestHandler._submit_request": "queue a decoded job",
    "litserve.server.RegularRequestHandler._handle_error_response": "a worker's error as HTTP",
}
