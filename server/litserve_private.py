"""litserve as this server uses it (litserve 0.2.19): the public API it relies on, and every name
beyond it, each with the reason, all used by server/litserve_adapter.py alone.

tests/test_litserve_private.py fails, naming the entry, when an installed litserve lacks a listed
name; when the adapter uses a non-public litserve name not listed here; and, listing them, when
any other server module uses a litserve name that is not in PUBLIC_NAMES (underscored or not,
imported, called, read, overridden or shadowed).
"""
# litserve's documented API (its README and docs: LitAPI, LitServer's arguments and run(),
# Logger, Callback); names, not dotted paths: they are the members our subclasses meet.
PUBLIC_NAMES: frozenset[str] = frozenset({
    # the package's exports
    "LitAPI", "LitServer", "Logger", "Callback", "Request", "Response", "configure_logging",
    # LitAPI: its hooks and constructor arguments
    "setup", "decode_request", "predict", "encode_response", "batch", "unbatch", "device",
    "max_batch_size", "batch_timeout", "api_path", "stream", "loop", "spec",
    # LitServer: constructor arguments, run(), the FastAPI app
    "accelerator", "devices", "workers_per_device", "timeout", "middlewares", "callbacks",
    "loggers", "run", "app", "port", "num_api_servers", "log_level",
})

PRIVATE_NAMES: dict[str, str] = {
    # module-level names
    "litserve.loops.base._SENTINEL_VALUE": "the worker queue's stop marker",
    "litserve.loops.base._StopLoopError": "raised to end a worker loop",
    "litserve.loops.simple_loops.BatchedLoop": "the worker loop next_batch/deliver hook into",
    "litserve.server.RegularRequestHandler": "the handler whose wait ends at the deadline",
    "litserve.utils.LitAPIStatus": "a worker answer's status",
    "litserve.utils.LoopResponseType": "a worker answer's kind",
    "litserve.utils.PickleableHTTPException": "an HTTP error sent from a worker",
    "litserve.utils.ResponseBufferItem": "where an HTTP process receives an answer",
    "litserve.utils.WorkerSetupStatus": "a worker's setup state (/health)",
    "litserve.callbacks.base.EventTypes": "the ON_RESPONSE event of a handled request",
    "litserve.callbacks.base.EventTypes.ON_RESPONSE": "fired once a request is answered",
    "litserve.callbacks.base.CallbackRunner.trigger_event": "fires an event's callbacks",
    "litserve.utils.LitAPIStatus.OK": "a result", "litserve.utils.LitAPIStatus.ERROR": "an error",
    "litserve.utils.LoopResponseType.REGULAR": "a whole (not streamed) answer",
    "litserve.utils.WorkerSetupStatus.READY": "set up", "litserve.utils.WorkerSetupStatus.ERROR":
        "failed to set up",
    "litserve.utils.ResponseBufferItem.response": "the answer received",
    "litserve.transport.base.MessageTransport.send": "sends an answer to an HTTP process",
    # LitServer methods overridden (AdaptedLitServer maps each onto a hook)
    "litserve.server.LitServer._register_api_endpoints": "routes that validate in the HTTP process",
    "litserve.server.LitServer._register_internal_endpoints": "/health, /info, /metrics",
    "litserve.server.LitServer._register_middleware": "no gzip",
    "litserve.server.LitServer._init_manager": "SIGTERM-proof manager, shared worker info",
    "litserve.server.LitServer._perform_graceful_shutdown": "bounded drain, dead-worker stop",
    "litserve.server.LitServer._start_worker_monitoring": "restart a dead worker, answer its "
                                                          "requests (server/supervisor.py)",
    # its wait for a first ready worker never ends when every worker dies without reporting
    "litserve.server.LitServer.verify_worker_status": "exit 1 when every worker died at start",
    # LitServer members called or read
    "litserve.server.LitServer._get_request_queue": "the queue a handler submits to",
    "litserve.server.LitServer._inference_workers_config_for_api": "workers per endpoint",
    "litserve.server.LitServer.launch_single_inference_worker": "restart one dead worker",
    "litserve.server.LitServer.litapi_connector": "instance attribute: the endpoints' LitAPIs",
    "litserve.server.LitServer.workers_setup_status": "instance attribute: workers' states",
    "litserve.server.LitServer.inference_workers": "instance attribute: worker processes",
    "litserve.server.LitServer.uvicorn_graceful_timeout": "instance attribute: the drain time",
    "litserve.server.LitServer.response_buffer": "instance attribute: answers by uid",
    "litserve.server.LitServer._shutdown_event": "instance attribute: wakes the main thread",
    "litserve.server.LitServer._callback_runner": "instance attribute: ON_RESPONSE callbacks",
    "litserve.server.LitServer._transport": "instance attribute: answer a dead worker's requests",
    # request handler and loop members
    "litserve.server.RegularRequestHandler._submit_request": "queue a decoded job",
    "litserve.server.RegularRequestHandler._handle_error_response": "a worker's error as HTTP",
    "litserve.server.RegularRequestHandler.server": "instance attribute: its LitServer",
    "litserve.loops.simple_loops.BatchedLoop.get_batch_requests": "forms a batch: next_batch",
    "litserve.loops.simple_loops.BatchedLoop.put_response": "sends an answer: deliver, "
                                                            "send_error",
    "litserve.loops.simple_loops.BatchedLoop.get_request": "one queued item: take",
}
