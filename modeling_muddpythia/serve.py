"""`mudd serve`: a MUDD causal LM behind transformers' own OpenAI-compatible server (`transformers serve`).

transformers' server (FastAPI + uvicorn, `transformers.cli.serve.Serve`) does all the serving: `/v1/completions`,
`/v1/chat/completions`, streaming, continuous batching. This module adds the two things a MUDD model needs from it:

* its model manager looks the model class up by name in the `transformers` namespace (`architectures[0]` of the
  config), where only transformers' own classes live: the MUDD causal-LM classes of the installed package are put
  there, in this process only;
* it passes request fields to generation without checking their types or ranges (a string `max_tokens` is a 500, a
  negative one an empty answer): each completion and chat request is first checked against the OpenAI request
  schema that transformers' handlers declare, and rejected with a 422 JSON error naming the field. The check is an
  HTTP middleware added to the FastAPI app that `Serve` builds with `serving.server.build_server`, which `serve`
  wraps while it starts the server. A tokenizer without a chat template makes chat requests a 400 saying so.

Both lean on the internals of the serving code, so they are tied to the transformers release this is tested with
(`TESTED_TRANSFORMERS`); another release stops `mudd serve` with an error instead of serving wrongly.
"""

from __future__ import annotations

import json
import sys

TESTED_TRANSFORMERS = "5.23"
SERVED_CLASSES = ("MUDDPythiaForCausalLM", "MUDDFormerForCausalLM")
# Request fields that the OpenAI schema types but does not bound, with the range generation needs.
FIELD_RANGES = {
    "max_tokens": (1, None),
    "max_completion_tokens": (1, None),
    "temperature": (0.0, None),
    "top_p": (0.0, 1.0),
}


class ServeError(ValueError):
    """A model or an environment that `mudd serve` does not serve (reported in one line, without a traceback)."""


def check_transformers_version(version: str) -> None:
    """Raise unless `version` is the transformers release whose serving internals `mudd serve` is tested with."""
    if ".".join(version.split(".")[:2]) != TESTED_TRANSFORMERS:
        raise ServeError(
            f"mudd serve is tested with transformers {TESTED_TRANSFORMERS}.x (it relies on its serving internals), "
            f"found {version}: install transformers>={TESTED_TRANSFORMERS},<5.24 or run `transformers serve` yourself"
        )


def served_architecture(model: str) -> str:
    """The config's `architectures[0]` of `model` (a folder or Hub id), which must be a MUDD causal LM."""
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(model), "architectures", None) or []
    if not architectures or architectures[0] not in SERVED_CLASSES:
        raise ServeError(
            f"{model} is a {architectures[0] if architectures else 'model without architectures'}, not one of "
            f"{', '.join(SERVED_CLASSES)}: serve it with `transformers serve`"
        )
    return architectures[0]


def make_classes_resolvable() -> None:
    """Put the MUDD causal-LM classes where transformers' model manager looks a config's architecture up.

    The manager does `getattr(transformers, config.architectures[0])` on the module object it imported, so this
    runs after the serving modules are imported and sets the classes on that very object.
    """
    import modeling_muddpythia
    from transformers.cli.serving import model_manager

    for name in SERVED_CLASSES:
        setattr(model_manager.transformers, name, getattr(modeling_muddpythia, name))


def _consume(value) -> None:
    """Walk a validated value: pydantic checks the items of fields typed `Iterable[...]` (chat `messages`, content
    parts) only when they are iterated."""
    if isinstance(value, dict):
        value = value.values()
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        for item in value:
            _consume(item)


def request_errors(body: object, schema, field_ranges: dict = FIELD_RANGES) -> str | None:
    """One line naming what is wrong with a completion or chat request body, or None if it is well formed.

    `schema` is a pydantic `TypeAdapter` of the handler's request TypedDict. The chat one types `stream` as
    `Literal[True]` (its streaming variant), so `stream` is checked here and the rest with `stream=True`.
    """
    from pydantic import ValidationError

    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return f"stream: must be a boolean, got {stream!r}"
    field = None
    try:
        for field, value in schema.validate_python({**body, "stream": True}).items():
            _consume(value)
    except ValidationError as error:
        first = error.errors()[0]
        # errors raised while iterating a lazily checked field locate themselves inside it
        location = [part for part in [field] if part is not None and first["loc"][:1] != (field,)]
        location = ".".join(str(part) for part in location + list(first["loc"]))
        return f"{location}: {first['msg']} (got {first.get('input')!r})"
    for field, (low, high) in field_ranges.items():
        value = body.get(field)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            return f"{field}: must be {bounds}, got {value!r}"
    return None


def add_request_validation(app, chat_template_missing: str | None = None) -> None:
    """Reject malformed `/v1/completions` and `/v1/chat/completions` requests with a 422 before they reach
    transformers' handlers (which would answer 500, or generate with a meaningless setting). With
    `chat_template_missing` (the reason), chat requests get a 400 saying so instead of a 500."""
    from fastapi.responses import JSONResponse
    from pydantic import TypeAdapter
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler

    schemas = {
        "/v1/completions": TypeAdapter(CompletionHandler._valid_params_class),
        "/v1/chat/completions": TypeAdapter(ChatCompletionHandler._valid_params_class),
    }

    @app.middleware("http")
    async def validate_request(request, call_next):
        schema = schemas.get(request.url.path)
        if request.method == "POST" and request.url.path == "/v1/chat/completions" and chat_template_missing:
            return JSONResponse({"detail": chat_template_missing}, status_code=400)
        if request.method == "POST" and schema is not None:
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None  # FastAPI answers malformed JSON with its own 422
            problem = None if body is None else request_errors(body, schema)
            if problem is not None:
                return JSONResponse({"detail": f"Invalid request: {problem}"}, status_code=422)
        return await call_next(request)


def serve(model: str, **options) -> None:
    """Serve `model` (a MUDD causal-LM folder or Hub id) with `transformers.cli.serve.Serve`; blocks until the
    server stops (Ctrl+C or SIGTERM). `options` are `Serve`'s keyword arguments."""
    import transformers

    check_transformers_version(transformers.__version__)
    served_architecture(model)
    chat_template_missing = None
    if not getattr(transformers.AutoTokenizer.from_pretrained(model), "chat_template", None):
        chat_template_missing = (
            f"{model} has no chat template (`chat_template` in tokenizer_config.json or chat_template.jinja): "
            "use /v1/completions"
        )
        print(f"mudd serve: {chat_template_missing}; /v1/chat/completions answers 400", file=sys.stderr)
    from transformers.cli import serve as transformers_serve
    from transformers.cli.serving import server

    make_classes_resolvable()
    build_server = server.build_server

    def build_validated_server(*args, **kwargs):
        app = build_server(*args, **kwargs)
        add_request_validation(app, chat_template_missing)
        return app

    server.build_server = build_validated_server  # `Serve` imports it when it builds the app
    try:
        transformers_serve.Serve(force_model=model, **options)
    finally:
        server.build_server = build_server


def add_serve_arguments(parser) -> None:
    """The options of `transformers serve` that apply to a MUDD model on the machines it runs on."""
    parser.add_argument("model", help="MUDDPythia or MUDDFormer folder (or Hub id) to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--device", default="auto", help="device of the model: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="dtype of the model: auto (as saved), float32, bfloat16, ...")
    parser.add_argument("--attn-implementation", default=None, help="eager, sdpa, flex_attention, flash_attention_2")
    parser.add_argument("--continuous-batching", action="store_true",
                        help="batch concurrent requests into one paged-attention forward (model.generate_batch)")
    parser.add_argument("--cb-num-blocks", type=int, default=None,
                        help="paged KV cache blocks of 256 tokens (default: sized from free memory)")
    parser.add_argument("--cb-max-batch-tokens", type=int, default=None, help="tokens per continuous batching step")
    parser.add_argument("--cb-max-memory-percent", type=float, default=None,
                        help="fraction of free accelerator memory for the paged KV cache")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoding step (static cache)")
    parser.add_argument("--chat-template-kwargs", default=None,
                        help="JSON object of default apply_chat_template keyword arguments")
    parser.add_argument("--default-seed", type=int, default=None, help="torch seed set at start-up")
    parser.add_argument("--enable-cors", action="store_true", help="allow cross-origin requests from anywhere")
    parser.add_argument("--log-level", default="warning", help="transformers log level: debug, info, warning, error")


def serve_from_arguments(args) -> int:
    options = {name: getattr(args, name) for name in (
        "host", "port", "device", "dtype", "attn_implementation", "continuous_batching", "cb_num_blocks",
        "cb_max_batch_tokens", "cb_max_memory_percent", "compile", "chat_template_kwargs",
        "default_seed", "enable_cors", "log_level",
    )}
    try:
        serve(args.model, **options)
    except ServeError as error:
        print(f"mudd serve: {error}", file=sys.stderr)
        return 2
    return 0
