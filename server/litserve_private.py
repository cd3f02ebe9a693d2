"""Every private litserve name the server relies on, in one list (litserve 0.2.19).

Only server/litserve_adapter.py uses them (it says why each is needed);
tests/test_litserve_private.py fails, naming the entry, when an installed litserve lacks one
of them, when the adapter uses one not listed here, and when any other server module uses a
private litserve name at all.
"""
PRIVATE_NAMES: dict[str, str] = {
    # module-level names
    "litserve.loops.base._SENTINEL_VALUE": "the worker queue's stop marker",
    "litserve.loops.base._StopLoopError": "raised to end a worker loop",
    # LitServer methods overridden (AdaptedLitServer maps each onto a public hook)
    "litserve.server.LitServer._register_api_endpoints": "routes that validate in the HTTP process",
    "litserve.server.LitServer._register_internal_endpoints": "/health, /info, /metrics",
    "litserve.server.LitServer._register_middleware": "no gzip",
    "litserve.server.LitServer._init_manager": "SIGTERM-proof manager, shared worker info",
    "litserve.server.LitServer._perform_graceful_shutdown": "bounded drain, dead-worker stop",
    "litserve.server.LitServer._start_worker_monitoring": "restart a dead worker, answer its "
                                                          "requests (server/supervisor.py)",
    # not underscored, but not public API either (not in litserve's docs): its wait for a first
    # ready worker never ends when every worker dies without reporting an error
    "litserve.server.LitServer.verify_worker_status": "exit 1 when every worker died at start",
    # LitServer members called
    "litserve.server.LitServer._get_request_queue": "the queue a handler submits to",
    "litserve.server.LitServer._inference_workers_config_for_api": "workers per endpoint",
    "litserve.server.LitServer._shutdown_event": "instance attribute: wakes the main thread",
    "litserve.server.LitServer._callback_runner": "instance attribute: ON_RESPONSE callbacks",
    "litserve.server.LitServer._transport": "instance attribute: answer a dead worker's requests",
    # request handler members
    "litserve.server.RegularRequestHandler._submit_request": "queue a decoded job",
    "litserve.server.RegularRequestHandler._handle_error_response": "a worker's error as HTTP",
}
