"""The HTTP API of ``qrm serve`` (FastAPI): ``POST /v1/score``, ``POST /get_reward`` (OpenRLHF's remote
reward model), ``GET /health``, ``GET /metrics`` (Prometheus text).

Every refusal is a JSON body ``{"error": {"status", "field", "message"}}`` naming the offending field
(``items[2].response``, ``query[0]``, ``body``, ``Authorization``), and the server goes on serving:

====  ==========================================================================================
400   the body is not valid JSON
401   ``--api-key`` is set and the request has no ``Authorization: Bearer <key>`` with that key
413   the body is over ``--max-body-bytes``, more than ``--max-items`` items, or an item longer than
      the model's sequence length (unless the request sends ``"truncate": true``)
422   a missing, misspelt or non-string field, an empty response, a chat without a final assistant turn
====  ==========================================================================================
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from starlette.requests import ClientDisconnect

from megatron_qrm.serving.batcher import DynamicBatcher
from megatron_qrm.serving.encoding import EncodedItem, ItemTooLong, RequestEncoder, split_query
from megatron_qrm.serving.metrics import ServerMetrics
from megatron_qrm.serving.scorer import sequence_score

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ServeLimits:
    max_body_bytes: int = 8 << 20
    max_items: int = 256
    api_key: Optional[str] = None


class ApiError(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


# ---------------------------------------------------------------------------- request bodies
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr
    content: StrictStr


class ScoreItem(BaseModel):
    """``{prompt, response}``, or ``{messages}`` whose last turn is the assistant's response (checked in
    :func:`_check_item`, which names the exact field)."""

    model_config = ConfigDict(extra="forbid")
    prompt: Optional[StrictStr] = None
    response: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None


def _check_item(i: int, item: ScoreItem) -> None:
    at = f"items[{i}]"
    if item.messages is not None:
        if item.prompt is not None or item.response is not None:
            raise ApiError(422, at, "send either messages or prompt + response, not both")
        if len(item.messages) < 2 or item.messages[-1].role != "assistant":
            raise ApiError(422, f"{at}.messages", "needs at least one turn before the response and the response "
                           "as the last message (role 'assistant')")
        if not item.messages[-1].content:
            raise ApiError(422, f"{at}.messages[{len(item.messages) - 1}].content", "the response is empty")
        return
    if item.prompt is None:
        raise ApiError(422, f"{at}.prompt", "field required (a string), or send messages instead")
    if item.response is None:
        raise ApiError(422, f"{at}.response", "field required (a string)")
    if not item.response:
        raise ApiError(422, f"{at}.response", "the response is empty")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ScoreItem] = Field(min_length=1)
    standardize: StrictBool = False
    truncate: StrictBool = False
    #: the prompts are already rendered (e.g. by the policy's chat template): use them as they are
    prompts_rendered: StrictBool = False


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward-model request: ``query`` = prompt + response texts as the policy decoded
    them, ``prompts`` = the prompt texts (so the response is ``query[len(prompt):]``); ``labels`` and any
    other field OpenRLHF adds are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    query: list[StrictStr] = Field(min_length=1)
    prompts: Optional[list[StrictStr]] = None
    truncate: StrictBool = False


# ---------------------------------------------------------------------------- helpers
def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _validate(model: type[BaseModel], data: Any):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        raise ApiError(422, _field_path(tuple(e["loc"])), msg) from None


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body", f"the body is {declared} bytes, over the limit of {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body", f"the body is over the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, "body", f"malformed JSON: {err}") from None


def _error_response(status: int, field: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"status": status, "field": field, "message": message}}, status_code=status,
                        headers=headers)


def standardize_credits(credits: list[np.ndarray]) -> list[np.ndarray]:
    """Credits standardised over every response token of the request: ``(c - mean) / std`` (population std;
    all-equal credits give zeros)."""
    flat = np.concatenate(credits)
    mean, std = float(flat.mean()), float(flat.std())
    scale = 1.0 / std if std > 1e-12 else 0.0
    return [(c - mean) * scale for c in credits]


# ---------------------------------------------------------------------------- the app
def create_app(encoder: RequestEncoder, batcher: DynamicBatcher, metrics: ServerMetrics, limits: ServeLimits,
               info: dict[str, Any]) -> FastAPI:
    """The FastAPI app; ``info`` (kind, checkpoint, seq_length, layout) is what ``/health`` reports."""
    app = FastAPI(title="qrm serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    kind = info["kind"]
    tok = encoder.tokenizer
    eos_texts = [tok.token_texts([tok.eos_id])[0], tok.token_texts([tok.pad_id])[0]]
    endpoints = {"/v1/score", "/get_reward", "/health", "/metrics"}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error_response(err.status, err.field, err.message)

    async def score_encoded(items: list[EncodedItem]) -> list[np.ndarray]:
        return list(await asyncio.gather(*batcher.submit(items)))

    def encode(prompts: list[tuple[str, bool]], responses: list[str], truncate: bool, fields: list[str]):
        try:
            return encoder.encode(prompts, responses, truncate, fields)
        except ItemTooLong as err:
            field = err.field
            if err.prompt_only and field.endswith(".response"):
                field = field[: -len(".response")] + ".prompt"
            raise ApiError(413, field, str(err)) from None

    def _check_count(body, key: str, noun: str) -> None:
        """413 naming ``key`` when the request lists more than --max-items entries (before validating them)."""
        if isinstance(body, dict) and isinstance(body.get(key), list) and len(body[key]) > limits.max_items:
            raise ApiError(413, key, f"{len(body[key])} {noun}, over the limit of {limits.max_items} (--max-items)")

    @app.post("/v1/score")
    async def score(request: Request):
        body = await _read_json(request, limits.max_body_bytes)
        _check_count(body, "items", "items")
        req = _validate(ScoreRequest, body)
        prompts, responses, fields = [], [], []
        for i, item in enumerate(req.items):
            _check_item(i, item)
            if item.messages is not None:
                try:
                    prompts.append(encoder.render_messages([m.model_dump() for m in item.messages[:-1]]))
                except Exception as err:  # a template that rejects the turns (roles, order) is the caller's
                    raise ApiError(422, f"items[{i}].messages", str(err)) from None
                responses.append(item.messages[-1].content)
                fields.append(f"items[{i}].messages")
            else:
                try:
                    prompts.append(encoder.rendered_text(item.prompt) if req.prompts_rendered
                                   else encoder.render_instruction(item.prompt))
                except ValueError as err:
                    raise ApiError(422, f"items[{i}].prompt", str(err)) from None
                responses.append(item.response)
                fields.append(f"items[{i}].response")
        items = encode(prompts, responses, req.truncate, fields)
        credits = await score_encoded(items)
        spans = encoder.spans(items)
        std = standardize_credits(credits) if req.standardize else None
        results = []
        for k, (it, c, sp) in enumerate(zip(items, credits, spans)):
            row = {
                "score": sequence_score(kind, c),
                "mean_credit": float(c.mean()),
                "num_tokens": len(it.response_ids),
                "prompt_tokens": len(it.prompt_ids),
                "truncated": it.truncated,
                "response_text": sp.response_text,
                "token_ids": it.response_ids,
                "tokens": sp.texts,
                "offsets": [[s, e] for s, e in zip(sp.starts, sp.ends)],
                "credits": c.tolist(),
            }
            if std is not None:
                row["standardized_credits"] = std[k].tolist()
            results.append(row)
        # plain JSON types already: JSONResponse skips FastAPI's jsonable_encoder walk over every number
        return JSONResponse({"kind": kind, "checkpoint": info["checkpoint"], "results": results})

    @app.post("/get_reward")
    async def get_reward(request: Request):
        body = await _read_json(request, limits.max_body_bytes)
        _check_count(body, "query", "queries")
        req = _validate(RewardRequest, body)
        if req.prompts is None:
            raise ApiError(422, "prompts", "required: a token-level reward model scores the response, and "
                           "prompts[i] tells where it starts in query[i]")
        if len(req.prompts) != len(req.query):
            raise ApiError(422, "prompts", f"{len(req.prompts)} prompts for {len(req.query)} queries")
        responses = []
        for i, (q, p) in enumerate(zip(req.query, req.prompts)):
            r = split_query(q, p, eos_texts, strip_prefixes=eos_texts[1:])
            if r is None:
                raise ApiError(422, f"query[{i}]", "does not start with prompts[{i}]".format(i=i))
            responses.append(r)
        prompts = [encoder.rendered_text(p) for p in req.prompts]
        items = encode(prompts, responses, req.truncate, [f"query[{i}]" for i in range(len(responses))])
        credits = await score_encoded(items)
        return JSONResponse({"rewards": [sequence_score(kind, c) for c in credits]})

    @app.get("/health")
    async def health():
        return {"status": "ok", **info}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    app.add_middleware(GuardMiddleware, metrics=metrics, api_key=limits.api_key, endpoints=endpoints)
    return app


class GuardMiddleware:
    """ASGI middleware (plain, no per-request task or stream: it sits on every request's path): the bearer
    key check (every path but ``/health``), and the request counters, errors and latency of every answer.

    A client that disconnects before its body has arrived (starlette's ``ClientDisconnect``) is not a server
    error: nothing can be answered, no traceback is logged, and it is counted in
    ``qrm_client_disconnects_total`` (not as a 500). A request still running when SIGTERM's
    ``--graceful-timeout`` ends is cancelled by uvicorn: it gets a 503 if nothing was sent yet, no traceback."""

    def __init__(self, app, metrics: ServerMetrics, api_key: Optional[str], endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500

        started = False

        async def send_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        self.metrics.in_flight.inc()
        gone = False
        try:
            if self.expected is not None and path != "/health":
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, self.expected):
                    response = _error_response(401, "Authorization", "a valid 'Authorization: Bearer <key>' "
                                               "header is required (--api-key)")
                    return await response(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        except ClientDisconnect:
            gone = True  # the client hung up mid-body: no one to answer
        except asyncio.CancelledError:
            # SIGTERM's --graceful-timeout ended with this request unfinished (e.g. its client stalled
            # mid-body) and uvicorn cancelled it: answer 503 if nothing was sent yet and end quietly (a
            # cancellation escaping the app is logged by uvicorn as "Exception in ASGI application")
            if not started:
                try:
                    await _error_response(503, "body", "the server is shutting down (--graceful-timeout ended "
                                          "before the request was complete)")(scope, receive, send_status)
                except Exception:  # noqa: BLE001 - the connection may be gone already
                    status = 503
        finally:
            self.metrics.in_flight.dec()
            if gone:
                self.metrics.client_disconnects.labels(path).inc()
            else:
                self.metrics.observe_request(path, status, time.perf_counter() - t0)
