"""The OpenAI-compatible HTTP API: ``create_app(loaded_model, model_name)`` -> a FastAPI app.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both also as server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``GET /metrics`` (Prometheus, ``metrics.py``), ``POST /v1/embeddings``, ``POST /tokenize``,
``POST /detokenize``, and the browser chat page at ``GET /`` (static files in ``ui/``, no build
step).

Every request is checked here, before it is queued: body shape and ranges (``schemas.py``),
model name, settings llamalab cannot honour, and prompt + ``max_tokens`` against the context.
Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for anything the client can fix. Generation runs on one worker thread: requests decoded
together by continuous batching (``worker.py``, ``generate/batching.py``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamalab.generate.chat import chat_stop_ids
from llamalab.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    _SamplingFields,
)
from llamalab.serve.worker import CANCELLED, DONE, ERROR, PIECE, BatchingWorker, GenerationWorker, Job, Piece

__all__ = ["APIError", "create_app"]

# OpenAI's defaults: completions stop after 16 tokens unless told otherwise, sampling at temperature 1.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
MAX_STOP_SEQUENCES = 4
DISCONNECT_POLL_S = 0.25
# Positions per request in the batch's KV cache when not told: a slot of the model's whole context
# (128K for Llama 3.1) would be gigabytes per request.
DEFAULT_CTX_SIZE = 4096
MAX_EMBEDDING_INPUTS = 256
# Bad clients: bodies over this are refused (413) before being read; bodies that do not arrive in
# this long after the request's start are dropped (408).
MAX_BODY_BYTES = 4 * 1024 * 1024
BODY_TIMEOUT_S = 10.0
# The chat page's files (index.html, chat.js, chat.css): served as they are.
UI_DIR = Path(__file__).with_name("ui")


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The JSON response carrying this error."""
        return JSONResponse(self.body(), status_code=self.status)


class _CountRequests:
    """Counts answered requests by route and status for ``/metrics``: a plain ASGI middleware (Starlette's
    ``BaseHTTPMiddleware`` would stand between the endpoints and the connection, hiding a client's
    disconnect from ``request.is_disconnected()``)."""

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # the route's template, so that unknown paths make one label
            self.metrics.on_request(getattr(route, "path", "unmatched"), status["code"])


class _BoundedBody:
    """A request body must be at most ``max_bytes`` (else 413) and arrive within ``timeout_s`` of the
    request's start (else 408: a client that sends its body a byte at a time, or stops half-way,
    holds a connection for that long at most). Once the body is in, reads are not timed: a
    streaming response's disconnect check reads on."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(413, f"the request body ({int(value)} bytes) is over {self.max_bytes} bytes",
                                   "request_too_large", scope, receive, send)
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = {"bytes": 0, "done": False}

        async def bounded_receive() -> dict[str, Any]:
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.max_bytes:
                    raise HTTPException(413, f"the request body is over {self.max_bytes} bytes")
                state["done"] = not message.get("more_body", False)
            return message

        await self.app(scope, bounded_receive, send)

    @staticmethod
    async def _refuse(status: int, message: str, code: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await APIError(status, message, code=code).response()(scope, receive, send)


class _RequireKey:
    """``Authorization: Bearer <key>`` on every route but ``/health`` and the chat page's files (the
    page asks for the key and sends it with its API calls), compared in constant time
    (``hmac.compare_digest``); anything else is answered 401 in OpenAI's shape before any work."""

    OPEN = ("/health", "/")
    OPEN_PREFIXES = ("/ui/",)

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if scope["type"] != "http" or path in self.OPEN or path.startswith(self.OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                given = token.strip() if scheme.lower() == b"bearer" else b""
        if hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' (the key the "
                            "server was started with, --api-key or LLAMALAB_API_KEY)", code="invalid_api_key")
        await err.response()(scope, receive, send)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(loaded_model: Any, model_name: str, *, generator: Any | None = None,
               default_max_tokens: int = 512, parallel: int = 4, ctx_size: int | None = None,
               api_key: str | None = None, threads: int | None = None,
               max_prefill_tokens: int = 4096) -> FastAPI:
    """The FastAPI app serving ``loaded_model`` (a ``llamalab.LoadedModel``) as ``model_name``.

    ``generator``: a ``llamalab.generate.Generator`` (default: one over the model and its
    tokenizer), whose requests are decoded together, up to ``parallel`` at once, in a KV cache of
    ``ctx_size`` positions per request (default: the model's context, at most 4096); or anything
    else with ``Generator``'s ``generate``/``stream``/``last_result``, run one request at a time.
    ``default_max_tokens``: the chat endpoint's answer limit when the request sets none (also
    capped by what the context leaves); completions default to OpenAI's 16. ``api_key``: every
    route but ``/health`` then needs ``Authorization: Bearer <api_key>`` (else 401). ``threads``:
    the model's threads on the worker's thread (default: this thread's count).
    ``max_prefill_tokens``: prompt tokens prefilled in one step at most (a longer prompt alone).
    """
    from llamalab.generate import Generator

    tok = loaded_model.tokenizer
    if tok is None:
        raise ValueError(f"{model_name}: the checkpoint has no tokenizer; the server needs one to read prompts")
    if parallel < 1:
        raise ValueError(f"parallel={parallel}: expected at least 1 request decoded at a time")
    if generator is None:
        generator = Generator(loaded_model.model, tok, vocab_limit=tok.vocab_size)
    context = loaded_model.config.max_seq_len
    if isinstance(generator, Generator):
        ctx_size = ctx_size or min(context, DEFAULT_CTX_SIZE)
        if not 1 <= ctx_size <= context:
            raise ValueError(f"ctx_size={ctx_size}: expected 1..{context} (the model's context)")
        worker: Any = BatchingWorker(generator, max_batch=parallel, max_seq_len=ctx_size, threads=threads,
                                     max_prefill_tokens=max_prefill_tokens)
        context = ctx_size
    else:
        worker = GenerationWorker(generator, threads=threads)
    from llamalab.serve.metrics import ServerMetrics

    metrics = ServerMetrics(worker)
    if isinstance(worker, BatchingWorker):
        worker.on_step, worker.on_finish = metrics.on_step, metrics.on_finish
    service = _Service(tok, context, model_name, worker, default_max_tokens,
                       embed_model=generator.model if isinstance(generator, Generator) else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="llamalab", description="OpenAI-compatible API over a llamalab model",
                  lifespan=lifespan)
    app.state.worker = worker
    app.state.service = service
    app.state.metrics = metrics

    app.add_middleware(_BoundedBody, max_bytes=MAX_BODY_BYTES, timeout_s=BODY_TIMEOUT_S)
    app.add_middleware(_CountRequests, metrics=metrics)
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)  # added last: runs first

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_to_api_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} (see /v1/models, /v1/completions, " \
                      "/v1/chat/completions, /v1/embeddings, /tokenize, /detokenize, /health, /metrics; " \
                      "the chat page is at /)"
        err = APIError(exc.status_code, message, code=code,
                       type="invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "busy": worker.busy, "waiting": worker.waiting,
                "running": getattr(worker, "running", int(worker.busy)), "completed": worker.completed,
                "skipped": worker.skipped}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id)
        return service.model_card()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        return await service.embeddings(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return service.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return service.detokenize(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await service.chat(body, request)

    return app


def mean_pooled_embeddings(model: Any, inputs: list[list[int]], batch: int = 8) -> list[Any]:
    """The L2-normalised mean of ``model``'s last hidden states over each input's tokens (numpy
    float32 vectors), in batches of right-padded inputs (causal attention: the padding after an
    input's tokens does not change them, and is left out of the mean)."""
    import torch

    out = []
    device = model.tok_embeddings.weight.device
    with torch.inference_mode():
        for at in range(0, len(inputs), batch):
            chunk = inputs[at:at + batch]
            longest = max(len(i) for i in chunk)
            tokens = torch.zeros(len(chunk), longest, dtype=torch.long, device=device)
            keep = torch.zeros(len(chunk), longest, 1, device=device)
            for j, ids in enumerate(chunk):
                tokens[j, : len(ids)] = torch.tensor(ids, device=device)
                keep[j, : len(ids)] = 1.0
            hidden = model.hidden_states(tokens).float()
            mean = (hidden * keep).sum(1) / keep.sum(1)
            out.extend(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
    return out


_UNION_TAGS = {"str", "int", "float", "bool"}


def _field_path(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages.0.content' (no body, no Union member tags)."""
    parts = [str(x) for x in loc if x != "body" and not (isinstance(x, str) and (x in _UNION_TAGS or "[" in x))]
    if parts[:1] == ["prompt"]:
        return "prompt"  # a Union of lists: the index within a member says nothing useful
    return ".".join(parts) or None


def _validation_to_api_error(errors: Sequence[Any]) -> APIError:
    """FastAPI's 422 details -> one OpenAI 400 naming the first offending parameter."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    kind = first.get("type", "")
    param = _field_path(first.get("loc", ()))
    if kind == "json_invalid":
        ctx = first.get("ctx", {})
        return APIError(400, f"the request body is not valid JSON ({ctx.get('error', first.get('msg'))})",
                        code="invalid_json")
    if param is None:
        if kind == "missing":
            return APIError(400, "the request body is missing: expected a JSON object", code="invalid_json")
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    if kind == "missing":
        return APIError(400, f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    same = [e for e in errors if _field_path(e.get("loc", ())) == param]
    msg = first.get("msg", "invalid value")
    if param == "prompt":
        msg = "expected a string, a list of strings, a list of token ids or a list of such lists"
    elif len(same) > 1:  # one error per member of a Union: say what the members are
        members = [str(e["loc"][-1]) for e in same if e.get("loc") and isinstance(e["loc"][-1], str)]
        msg = f"expected one of: {', '.join(dict.fromkeys(members))}" if members else msg
    others = len({_field_path(e.get("loc", ())) for e in errors} - {param})
    extra = f" (and {others} more invalid parameter{'s' if others > 1 else ''})" if others else ""
    return APIError(400, f"invalid value for '{param}': {msg}{extra}", param=param, code="invalid_value")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _JobStreamingResponse(StreamingResponse):
    """A streaming response that cancels its job however the response ends (done, error, disconnect)."""

    def __init__(self, content: Any, job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()  # a finished job ignores it; a running one stops after its next token


class _Service:
    """What the endpoints do, given the tokenizer, the context length and the worker."""

    def __init__(self, tok: Any, context: int, model_name: str, worker: Any,
                 default_max_tokens: int, embed_model: Any = None) -> None:
        self.tok = tok
        self.embed_model = embed_model
        self.context = context
        self.model_name = model_name
        self.worker = worker
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    # ----------------------------------------------------------------- checks and settings

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llamalab",
                "context_length": self.context}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check_common(self, req: _SamplingFields) -> None:
        self.check_model(req.model)
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(req, field):
                raise APIError(400, f"'{field}' is not supported (only 0); llamalab offers "
                                    "'repetition_penalty' instead", param=field, code="unsupported_parameter")
        if req.stream and req.n > 1:
            raise APIError(400, "'n' > 1 is not supported with 'stream': true", param="n",
                           code="unsupported_parameter")

    def _stops(self, stop: str | list[str] | None) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}",
                           param="stop", code="invalid_value")
        if any(s == "" for s in stops):
            raise APIError(400, "'stop' sequences must not be empty", param="stop", code="invalid_value")
        return tuple(stops)

    def _config(self, req: _SamplingFields, max_tokens: int, logprobs: bool, stop_ids: Any = None) -> Any:
        from llamalab.generate import GenerationConfig

        cfg = GenerationConfig(
            stop_ids=tuple(stop_ids) if stop_ids else None,
            max_new_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            seed=req.seed, stop_strings=self._stops(req.stop), logprobs=logprobs,
            logit_bias=self._logit_bias(req.logit_bias))
        try:
            cfg.validate()
        except ValueError as e:  # "GenerationConfig.<field>=...: expected ..." -> the request's name for it
            match = re.match(r"GenerationConfig\.(\w+)=", str(e))
            field = match.group(1) if match else None
            param = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}.get(field or "", field)
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        return cfg

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's ``logit_bias`` (token id strings -> -100..100) as the engine's {id: bias}."""
        if not bias:
            return None
        out = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < self.tok.vocab_size:
                raise APIError(400, f"'logit_bias' key {key!r} is not a token id (0..{self.tok.vocab_size - 1})",
                               param="logit_bias", code="invalid_value")
            if not -100 <= value <= 100:
                raise APIError(400, f"'logit_bias' value {value} for token {key} is outside [-100, 100]",
                               param="logit_bias", code="invalid_value")
            out[token] = float(value)
        return out

    def _check_context(self, prompts: list[list[int]], max_tokens: int, what: str) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} "
                                "in the completion). Please reduce the length of the "
                                f"{what} or the completion.", param=what, code="context_length_exceeded")

    def _encode_prompts(self, prompt: Any, field: str = "prompt") -> list[list[int]]:
        """The ``prompt`` (or ``field``) value (text, texts, ids, lists of ids) -> one id list per prompt."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, f"'{field}' is empty", param=field, code="invalid_value")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out: list[list[int]] = []
        for p in prompt:
            ids = self.tok.encode(p, bos=self.tok.add_bos_default) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, f"'{field}' is empty (it encodes to no tokens)", param=field,
                               code="invalid_value")
            bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
            if bad:
                raise APIError(400, f"'{field}' holds token id {bad[0]} outside the vocabulary "
                                    f"(0..{self.tok.vocab_size - 1})", param=field, code="invalid_value")
            out.append(ids)
        return out

    def _render_chat(self, req: ChatCompletionRequest) -> list[int]:
        from jinja2 import TemplateError

        from llamalab.generate import encode_chat

        tok = self.tok
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"only text content parts are supported (got type "
                                            f"{part.get('type')!r})", param=f"messages.{i}.content",
                                       code="unsupported_content")
                    parts.append(part["text"])
                content = "".join(parts)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            # The checkpoint's template, else Llama 3's or Llama 2's format (see generate/chat.py).
            ids = encode_chat(tok, messages)
        except (TemplateError, TypeError, ValueError) as e:
            raise APIError(400, f"the chat format rejected the messages: {e}", param="messages",
                           code="invalid_messages") from None
        if not ids:
            raise APIError(400, "the messages render to an empty prompt", param="messages", code="invalid_value")
        return ids

    # ----------------------------------------------------------------- /v1/embeddings

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Any:
        """Each input's embedding: the mean of the model's last hidden states (after the final
        RMSNorm) over its tokens, L2-normalised (as OpenAI's embeddings are, so that a dot product
        is the cosine)."""
        self.check_model(req.model)
        if self.embed_model is None:
            raise APIError(400, "this server's generator cannot compute embeddings", code="unsupported_endpoint")
        dim = self.embed_model.config.dim
        if req.dimensions is not None and req.dimensions != dim:
            raise APIError(400, f"'dimensions' must be the model's {dim} (no shortening)", param="dimensions",
                           code="unsupported_parameter")
        inputs = self._encode_prompts(req.input, "input")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"'input' holds {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS}", param="input",
                           code="invalid_value")
        longest = max(len(i) for i in inputs)
        if longest > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; an input has "
                                f"{longest}", param="input", code="context_length_exceeded")
        job = Job(prompts=inputs, config=None, stream=False, loop=asyncio.get_running_loop(),
                  call=lambda: mean_pooled_embeddings(self.embed_model, inputs))
        self.worker.submit(job)
        try:
            vectors = await self._results(job, request)
        except _ClientGone:
            return Response(status_code=499)
        data = []
        for i, v in enumerate(vectors):
            if req.encoding_format == "base64":
                emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode()
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(i) for i in inputs)
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    # ----------------------------------------------------------------- /tokenize, /detokenize

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a text (as completions encode it) or of a conversation (as chat renders it)."""
        if req.model is not None:
            self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' (text) and 'messages' (a conversation)",
                           param="prompt", code="invalid_value")
        if req.messages is not None:
            ids = self._render_chat(ChatCompletionRequest(model=self.model_name, messages=req.messages))
        else:
            bos = self.tok.add_bos_default and req.add_special_tokens
            ids = self.tok.encode(req.prompt, bos=bos) if req.prompt else []
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        """The text of token ids."""
        if req.model is not None:
            self.check_model(req.model)
        bad = [i for i in req.tokens if not 0 <= i < self.tok.vocab_size]
        if bad:
            raise APIError(400, f"'tokens' holds id {bad[0]} outside the vocabulary (0..{self.tok.vocab_size - 1})",
                           param="tokens", code="invalid_value")
        return {"prompt": self.tok.decode(req.tokens)}

    # ----------------------------------------------------------------- running jobs

    async def _events(self, job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
        """The job's events until the terminal one; stops (cancelling the job) if the client leaves."""
        loop = asyncio.get_running_loop()
        get = asyncio.ensure_future(job.events.get())
        checked = loop.time()
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
                if loop.time() - checked >= DISCONNECT_POLL_S:  # while waiting, and between pieces
                    checked = loop.time()
                    if await request.is_disconnected():
                        job.cancelled.set()
                        raise _ClientGone
                if not done:
                    continue
                kind, payload = get.result()
                yield kind, payload
                if kind in (DONE, ERROR, CANCELLED):
                    return
                get = asyncio.ensure_future(job.events.get())
        finally:
            get.cancel()

    def _submit(self, prompts: list[list[int]], cfg: Any, stream: bool) -> Job:
        job = Job(prompts=prompts, config=cfg, stream=stream, loop=asyncio.get_running_loop())
        self.worker.submit(job)
        return job

    async def _results(self, job: Job, request: Request) -> list[Any]:
        """Wait for a job's results (non-streaming requests)."""
        try:
            async for kind, payload in self._events(job, request):
                if kind == DONE:
                    return payload
                if kind == ERROR:
                    raise _engine_error(payload)
                if kind == CANCELLED:
                    raise _ClientGone
        finally:
            job.cancelled.set()
        raise _ClientGone

    @staticmethod
    def _usage(prompts: list[list[int]], results: list[Any]) -> dict[str, int]:
        p = sum(len(x) for x in prompts)
        c = sum(len(r.ids) for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _token_logprobs(self, result: Any) -> list[tuple[int, float]]:
        """(id, logprob) of each generated token that starts inside the answer's text.

        That drops the stop token, and the tokens after the start of a stop string (the engine's
        ``ids`` keep them; its ``text`` is cut there). Offsets are counted in UTF-8 bytes, since a
        token may hold part of a character.
        """
        n_bytes = len(result.text.encode("utf-8"))
        pairs, offset = [], 0
        for t, lp in zip(result.ids, result.logprobs or []):
            if offset >= n_bytes:
                break
            pairs.append((t, lp))
            offset += len(self.tok.token_bytes(t))
        return pairs

    def _chat_token(self, token: int, logprob: float) -> dict[str, Any]:
        """One entry of a chat answer's ``logprobs.content``."""
        return {"token": self.tok.decode([token]), "logprob": logprob, "bytes": list(self.tok.token_bytes(token)),
                "top_logprobs": []}

    def _check_stream_logprobs(self) -> None:
        if not isinstance(self.worker, BatchingWorker):  # a custom generator streams text only
            raise APIError(400, "'logprobs' with 'stream': true needs llamalab's own generator; this server's "
                                "streams text only", param="logprobs", code="unsupported_parameter")

    # ----------------------------------------------------------------- /v1/completions

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check_common(req)
        if req.echo:
            raise APIError(400, "'echo' is not supported", param="echo", code="unsupported_parameter")
        if req.suffix:
            raise APIError(400, "'suffix' is not supported", param="suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "'best_of' other than 'n' is not supported", param="best_of",
                           code="unsupported_parameter")
        if req.stream and req.logprobs is not None:
            self._check_stream_logprobs()
        prompts = self._encode_prompts(req.prompt)
        if req.stream and len(prompts) > 1:
            raise APIError(400, "several prompts are not supported with 'stream': true", param="prompt",
                           code="unsupported_parameter")
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        self._check_context(prompts, max_tokens, "prompt")
        cfg = self._config(req, max_tokens, logprobs=req.logprobs is not None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}

        all_prompts = [p for p in prompts for _ in range(req.n)]
        job = self._submit(all_prompts, cfg, stream=req.stream or len(all_prompts) == 1)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            tokens = _StreamedTokens(self.tok) if req.logprobs is not None else None
            prompt_text = req.prompt if isinstance(req.prompt, str) else self.tok.decode(prompts[0])
            offset = [len(prompt_text)]

            def completion_logprobs(piece: Piece) -> dict[str, Any] | None:
                if tokens is None:
                    return None
                out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": None, "text_offset": []}
                for t, lp in tokens.shown(piece):
                    text = self.tok.decode([t])
                    out["tokens"].append(text), out["token_logprobs"].append(lp), out["text_offset"].append(offset[0])
                    offset[0] += len(text)
                return out

            async def sse() -> AsyncIterator[str]:
                async for kind, payload in self._events(job, request):
                    if kind == PIECE:
                        yield _sse({**head, "choices": [{"index": 0, "text": payload.text,
                                                         "logprobs": completion_logprobs(payload),
                                                         "finish_reason": None}]})
                    elif kind == DONE:
                        (result,) = payload
                        yield _sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                         "finish_reason": result.finish_reason}]})
                        if include_usage:
                            yield _sse({**head, "choices": [], "usage": self._usage(prompts, payload)})
                    elif kind == ERROR:
                        yield _sse(_engine_error(payload).body())
                yield "data: [DONE]\n\n"

            return _JobStreamingResponse(_guard(sse()), job)

        try:
            results = await self._results(job, request)
        except _ClientGone:
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            logprobs = None
            if req.logprobs is not None:
                prompt_text = req.prompt if isinstance(req.prompt, str) else self.tok.decode(all_prompts[i])
                tokens, lps, offsets = [], [], []
                offset = len(prompt_text)
                for t, lp in self._token_logprobs(r):
                    text = self.tok.decode([t])
                    tokens.append(text), lps.append(lp), offsets.append(offset)
                    offset += len(text)
                logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}
            choices.append({"index": i, "text": r.text, "logprobs": logprobs, "finish_reason": r.finish_reason})
        return JSONResponse({**head, "choices": choices, "usage": self._usage(prompts, results)})

    # ----------------------------------------------------------------- /v1/chat/completions

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_common(req)
        if req.tools:
            raise APIError(400, "'tools' are not supported", param="tools", code="unsupported_parameter")
        kind = (req.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object"):
            raise APIError(400, f"'response_format' type {kind!r} is not supported: 'text', or 'json_object' (the "
                                "answer constrained to a JSON object token by token; no schemas)",
                           param="response_format", code="unsupported_parameter")
        if kind == "json_object" and not isinstance(self.worker, BatchingWorker):
            raise APIError(400, "'response_format' json_object needs llamalab's own generator",
                           param="response_format", code="unsupported_parameter")
        if req.logprobs and req.top_logprobs:
            raise APIError(400, "'top_logprobs' > 0 is not supported: llamalab returns the chosen token's "
                                "logprob only (use top_logprobs 0)", param="top_logprobs",
                           code="unsupported_parameter")
        if req.stream and req.logprobs:
            self._check_stream_logprobs()
        ids = self._render_chat(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, self.context - len(ids))
            if max_tokens < 1:
                self._check_context([ids], 1, "messages")
        self._check_context([ids], max_tokens, "messages")
        cfg = self._config(req, max_tokens, logprobs=req.logprobs, stop_ids=chat_stop_ids(self.tok))
        cfg.json_object = kind == "json_object"
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if req.stream else "chat.completion",
                "created": created, "model": self.model_name}
        prompts = [ids]
        job = self._submit([ids] * req.n, cfg, stream=req.stream or req.n == 1)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            tokens = _StreamedTokens(self.tok) if req.logprobs else None

            def chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> str:
                return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": finish}]})

            def chat_logprobs(piece: Piece) -> dict[str, Any] | None:
                if tokens is None:
                    return None
                return {"content": [self._chat_token(t, lp) for t, lp in tokens.shown(piece)], "refusal": None}

            async def sse() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for kind, payload in self._events(job, request):
                    if kind == PIECE:
                        yield chunk({"content": payload.text}, None, chat_logprobs(payload))
                    elif kind == DONE:
                        yield chunk({}, payload[0].finish_reason)
                        if include_usage:
                            yield _sse({**head, "choices": [], "usage": self._usage(prompts, payload)})
                    elif kind == ERROR:
                        yield _sse(_engine_error(payload).body())
                yield "data: [DONE]\n\n"

            return _JobStreamingResponse(_guard(sse()), job)

        try:
            results = await self._results(job, request)
        except _ClientGone:
            return Response(status_code=499)
        choices = []
        for i, r in enumerate(results):
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [self._chat_token(t, lp) for t, lp in self._token_logprobs(r)],
                            "refusal": None}
            choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                            "logprobs": logprobs, "finish_reason": r.finish_reason})
        return JSONResponse({**head, "choices": choices, "usage": self._usage(prompts, results)})


class _StreamedTokens:
    """Which generated tokens a streamed piece shows first: a token is reported with the piece that
    holds its first byte, so that the tokens reported over a stream are the ones a plain request
    reports (``_Service._token_logprobs``): those that start inside the answer's text, which leaves
    out the stop token and whatever follows the start of a stop string. Offsets in UTF-8 bytes."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.pending: list[tuple[int, float]] = []
        self.shown_bytes = 0  # bytes of text streamed so far
        self.next_at = 0  # where the next pending token starts

    def shown(self, piece: Piece) -> list[tuple[int, float]]:
        """The (id, logprob) pairs whose first byte is in the text streamed up to and with ``piece``."""
        self.pending.extend(zip(piece.ids, piece.logprobs or ()))
        self.shown_bytes += len(piece.text.encode("utf-8"))
        out = []
        while self.pending and self.next_at < self.shown_bytes:
            t, lp = self.pending.pop(0)
            out.append((t, lp))
            self.next_at += len(self.tok.token_bytes(t))
        return out


async def _guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends the event stream quietly when the client has gone (the job is cancelled by then)."""
    try:
        async for item in events:
            yield item
    except _ClientGone:
        return


def _engine_error(exc: BaseException) -> APIError:
    """An exception from the generator -> 400 for a bad setting it caught, else 500."""
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
