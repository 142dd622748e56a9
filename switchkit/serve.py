"""``toolkit serve``: switch generation behind an OpenAI-compatible HTTP API (FastAPI under uvicorn).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream=true``: server-sent events in
OpenAI's chunk format), ``GET /v1/models``, and ``GET /health`` (the batching loop's counts). The request's
``model`` picks the policy (:class:`Catalog`): ``switch`` (the trained switcher), ``random``, ``untuned``, or a
candidate's name (that model alone); ``switch[aligned_bias=B]`` applies the cost knob to one request. Each choice
carries a ``switchkit`` field: its segments (which model wrote which text) and the switcher's probabilities.

Requests share forward passes through one :class:`switchkit.batching.BatchLoop`; a request that is cancelled or
disconnected leaves it at once. Sampling settings default to the recipe's ``generation`` section (``max_tokens``:
``generation.max_new_tokens``, also its upper limit; ``stop``: ``generation.stop``, replaced when given). Choice
``j`` of a request with ``seed=s`` is drawn with seed ``s * 1_000_003 + j``, the seed ``toolkit generate`` gives
line ``j`` under ``generation.seed=s``, so both write the same text. Bad requests get OpenAI-style JSON errors.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request, imported locally)
import asyncio
import copy
import json
import math
import re
import secrets
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

from .batching import BatchLoop, Job
from .config import ConfigError, GenerationConfig, Recipe, candidate_name
from .engine import SwitchEngine
from .policies import Policy, SwitcherPolicy, check_policy, make_policy
from .runner import item_seed

MAX_CHOICES = 64  # prompts x n in one request
MAX_SEED = 2**40  # |seed|: item seeds stay within 64 bits
ROLES = ("system", "developer", "user", "assistant")
VARIANT = re.compile(r"^(?P<base>[^\[\]]+)\[aligned_bias=(?P<bias>[^\]]+)\]$")
UNSUPPORTED = {  # fields that would change what a response means: refused unless at their neutral value
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class APIError(Exception):
    """A refused request: its HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- models


def check_names(recipe: Recipe) -> None:
    """No pool candidate may take a served policy's name."""
    clash = sorted({"switch", "random", "untuned"} & {candidate_name(c) for c in recipe.pool.candidates})
    if clash:
        raise ConfigError(f"pool candidate name {clash[0]!r} is also a served policy: rename it (pool.candidates.N.name)")


def serves_switch(recipe: Recipe, switcher: Optional[str] = None) -> bool:
    """Whether ``switch`` is served: a trained switcher is given (``switcher=``, ``switcher.path``) or exported."""
    from .artifacts import switcher_dir

    return bool(switcher or recipe.switcher.path or switcher_dir(recipe).exists())


class Catalog:
    """The served models: ``switch`` (when a trained switcher is given or exported), ``random``, ``untuned``, and
    each candidate by name; ``NAME[aligned_bias=B]`` is switcher policy ``NAME`` with the cost knob at ``B``."""

    def __init__(self, recipe: Recipe, engine: SwitchEngine, switcher: Optional[str] = None):
        from .artifacts import switcher_dir

        check_names(recipe)
        candidates = [c.name for c in engine.pool.candidates]
        self.policies: dict[str, Policy] = {}
        self.note = ""
        if serves_switch(recipe, switcher):
            self.policies["switch"] = make_policy(recipe, engine, "trained", switcher)
        else:
            self.note = (f"no trained switcher at {switcher_dir(recipe)}: `switch` is not served (run `toolkit "
                         f"train-switcher recipe={recipe.name}` or pass switcher=DIR)")
        self.policies["random"] = make_policy(recipe, engine, "random")
        self.policies["untuned"] = make_policy(recipe, engine, "untuned")
        for name in candidates:
            self.policies[name] = make_policy(recipe, engine, "single", name)
        self._variants: dict[str, Policy] = {}

    @property
    def names(self) -> list[str]:
        return list(self.policies)

    def resolve(self, name: Any) -> Policy:
        """The policy a request's ``model`` names; a 404 :class:`APIError` when it names none."""
        if not isinstance(name, str) or not name:
            raise APIError(400, "model is missing: give one of " + ", ".join(self.names), "model")
        if name in self.policies:
            return self.policies[name]
        match = VARIANT.match(name)
        base = self.policies.get(match["base"]) if match else None
        if isinstance(base, SwitcherPolicy):
            try:
                bias = float(match["bias"])
            except ValueError:
                bias = math.nan
            if math.isfinite(bias):
                key = f"{match['base']}[aligned_bias={bias:g}]"
                if key not in self._variants:
                    if len(self._variants) >= 256:
                        self._variants.clear()
                    variant = copy.copy(base)
                    variant.aligned_bias, variant.owned = bias, ()
                    self._variants[key] = variant
                return self._variants[key]
        switchers = [n for n, p in self.policies.items() if isinstance(p, SwitcherPolicy)]
        raise APIError(404, f"model {name!r} does not exist: served are {', '.join(self.names)}, and "
                       f"{' / '.join(f'{n}[aligned_bias=B]' for n in switchers)} with a number B", "model",
                       "model_not_found")

    def close(self) -> None:
        for policy in self.policies.values():
            policy.close()


# ---------------------------------------------------------------- requests


@dataclass
class Plan:
    """A validated request: the policy, one query per prompt, ``n`` choices each, the seed and settings."""

    model: str
    policy: Policy
    queries: list[str]
    n: int
    seed: int
    settings: GenerationConfig
    stream: bool
    include_usage: bool
    chat: bool

    @property
    def choice_queries(self) -> list[str]:
        """One query per choice: prompt ``p``'s choice ``j`` is choice ``p * n + j``."""
        return [q for q in self.queries for _ in range(self.n)]


def _bad(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


def _number(body: dict, name: str, default, ok, allowed: str, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise _bad(f"{name}={json.dumps(value)} is not allowed: give {allowed}", name)
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"{where}.content must be a string or a list of text parts", where)


def messages_to_query(messages: Any) -> str:
    """The one query a conversation stands for (switch generation answers a query; each model renders it with
    its own template): a single user message is the query as it is; system and developer messages come first,
    a blank line apart; several user/assistant turns become a ``User: ...`` / ``Assistant: ...`` transcript."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages is empty: give at least one message with role user", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise _bad(f"messages.{i}.role={json.dumps(role)} is not allowed: allowed are {', '.join(ROLES)}",
                       f"messages.{i}.role")
        turns.append((m["role"], _text(m.get("content"), f"messages.{i}")))
    if not any(role == "user" for role, _ in turns):
        raise _bad("messages has no user message", "messages")
    dialogue = [(role, text) for role, text in turns if role in ("user", "assistant")]
    said = dialogue[0][1] if len(dialogue) == 1 else "\n\n".join(f"{r.capitalize()}: {t}" for r, t in dialogue)
    query = "\n\n".join([t for r, t in turns if r in ("system", "developer")] + [said])
    if not query.strip():
        raise _bad("messages hold no text: give a non-empty user message", "messages")
    return query


def prompts_to_queries(prompt: Any) -> list[str]:
    """A completion request's ``prompt``: a non-empty string or a list of them (token ids are not taken)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _bad("prompt must be a non-empty string or a list of them (token ids are not supported)", "prompt")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise _bad(f"prompt{'' if isinstance(prompt, str) else f'.{i}'} is empty", "prompt")
    return prompts


def parse_request(body: Any, chat: bool, catalog: Catalog, defaults: GenerationConfig) -> Plan:
    """Validate a request body; a 4xx :class:`APIError` naming the field when something is wrong."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise _bad(f"{name} is not supported by switch generation", name)
    policy = catalog.resolve(body.get("model"))
    queries = [messages_to_query(body.get("messages"))] if chat else prompts_to_queries(body.get("prompt"))
    limit = defaults.max_new_tokens
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, limit, lambda v: v >= 1, "an integer >= 1", integer=True)
    if max_tokens > limit:
        raise _bad(f"{name}={max_tokens} is over the limit of {limit} (generation.max_new_tokens; raise it when "
                   "starting the server)", name)
    if max_tokens < defaults.patch_size:
        raise _bad(f"{name}={max_tokens} is below the patch size {defaults.patch_size}: a response is written in "
                   f"patches of {defaults.patch_size} tokens", name)
    n = _number(body, "n", 1, lambda v: v >= 1, "an integer >= 1", integer=True)
    if n * len(queries) > MAX_CHOICES:
        raise _bad(f"n={n} x {len(queries)} prompt(s) is over the limit of {MAX_CHOICES} choices per request", "n")
    temperature = _number(body, "temperature", defaults.temperature, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _number(body, "top_p", defaults.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = _number(body, "seed", None, lambda v: abs(v) <= MAX_SEED, "an integer in [-2**40, 2**40]", integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = list(defaults.stop)
    else:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop must be a non-empty string or a list of up to 16 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    settings = replace(defaults, temperature=float(temperature), top_p=float(top_p), max_new_tokens=max_tokens,
                       stop=list(stop))
    seed = secrets.randbelow(2**31) if seed is None else seed
    return Plan(body["model"], policy, queries, n, seed, settings, stream, bool(options.get("include_usage")), chat)


# ---------------------------------------------------------------- responses


def _segments(record: dict, names: list[str]) -> list[dict]:
    return [{**g, "name": names[g["model"]]} for g in record["segments"]]


def _usage(plan: Plan, done: list[dict]) -> dict:
    prompt = sum(done[p * plan.n]["prompt_tokens"] for p in range(len(plan.queries)))
    completion = sum(g["n_tokens"] for ev in done for g in ev["record"]["segments"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(plan: Plan, rid: str, created: int, done: list[dict], names: list[str]) -> dict:
    """The OpenAI response object of a finished request (``chat.completion`` or ``text_completion``)."""
    choices = []
    for k, ev in enumerate(done):
        record = ev["record"]
        extra = {"segments": _segments(record, names), "switch_probs": record["switch_probs"], "seed": record["seed"]}
        choice = {"index": k, "finish_reason": FINISH[ev["finish_reason"]], "logprobs": None, "switchkit": extra}
        if plan.chat:
            choice["message"] = {"role": "assistant", "content": record["output"]}
        else:
            choice["text"] = record["output"]
        choices.append(choice)
    return {"id": rid, "object": "chat.completion" if plan.chat else "text_completion", "created": created,
            "model": plan.model, "choices": choices, "usage": _usage(plan, done), "system_fingerprint": None,
            "switchkit": {"seed": plan.seed}}


def chunk_body(plan: Plan, rid: str, created: int, ev: dict, first: bool, names: list[str]) -> dict:
    """One streamed chunk: the text one patch made final, who wrote it, and (at the end) the whole record."""
    extra = {"model": ev["model"], "name": names[ev["model"]], "probs": ev["probs"]}
    record = ev["record"]
    if record is not None:
        extra.update(segments=_segments(record, names), switch_probs=record["switch_probs"], seed=record["seed"])
    choice = {"index": ev["index"], "logprobs": None, "switchkit": extra,
              "finish_reason": FINISH[ev["finish_reason"]] if ev["finish_reason"] else None}
    if plan.chat:
        choice["delta"] = {"role": "assistant", "content": ev["text"]} if first else {"content": ev["text"]}
    else:
        choice["text"] = ev["text"]
    return {"id": rid, "object": "chat.completion.chunk" if plan.chat else "text_completion", "created": created,
            "model": plan.model, "choices": [choice], "system_fingerprint": None}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- the app


def create_app(loop: BatchLoop, catalog: Catalog, defaults: GenerationConfig):
    """The FastAPI app over a running :class:`BatchLoop` and the served :class:`Catalog`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="switchkit", description="Switch generation behind an OpenAI-compatible API")
    names = [c.name for c in loop.engine.pool.candidates]

    @app.exception_handler(APIError)
    async def refused(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def failed(request, exc: Exception):  # the server answers and goes on
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "switchkit"} for name in catalog.names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **loop.status()}

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(f"malformed JSON in the request body ({getattr(exc, 'msg', exc)})") from None

    def submit(plan: Plan) -> tuple[Job, asyncio.Queue]:
        events: asyncio.Queue = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        queries = plan.choice_queries
        job = Job(queries, [item_seed(plan.seed, k) for k in range(len(queries))], plan.policy, plan.settings,
                  lambda ev: aloop.call_soon_threadsafe(events.put_nowait, ev))
        loop.submit(job)
        return job, events

    async def next_event(events: asyncio.Queue, request: Request, watch: bool) -> Optional[dict]:
        """The job's next event; None when the client has gone (checked every half second when ``watch``)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5) if watch else await events.get()
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    async def answer(request: Request, chat: bool):
        plan = parse_request(await body_of(request), chat, catalog, defaults)
        job, events = submit(plan)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        count = len(plan.choice_queries)
        if plan.stream:
            return StreamingResponse(stream(request, plan, job, events, rid, created, count),
                                     media_type="text/event-stream")
        done: list[Optional[dict]] = [None] * count
        try:
            while any(d is None for d in done):
                ev = await next_event(events, request, watch=True)
                if ev is None:
                    return Response(status_code=499)
                if "error" in ev:
                    raise APIError(ev["status"], ev["error"])
                if ev["record"] is not None:
                    done[ev["index"]] = ev
        finally:
            if any(d is None for d in done):
                loop.cancel(job)
        return completion_body(plan, rid, created, done, names)

    async def stream(request, plan, job, events, rid, created, count):
        started, done = set(), []
        try:
            while len(done) < count:
                ev = await next_event(events, request, watch=False)
                if "error" in ev:
                    yield _sse(APIError(ev["status"], ev["error"]).body())
                    return
                yield _sse(chunk_body(plan, rid, created, ev, ev["index"] not in started, names))
                started.add(ev["index"])
                if ev["record"] is not None:
                    done.append(ev)
            if plan.include_usage:
                done.sort(key=lambda ev: ev["index"])
                yield _sse({"id": rid, "object": "chat.completion.chunk" if plan.chat else "text_completion",
                            "created": created, "model": plan.model, "choices": [], "usage": _usage(plan, done)})
            yield "data: [DONE]\n\n"
        finally:
            if len(done) < count:
                loop.cancel(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    return app


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread (port 0: a free one); yields ``http://host:port/v1``."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="switchkit-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join()


@contextmanager
def serving(recipe: Recipe, engine: SwitchEngine, switcher: Optional[str] = None) -> Iterator[tuple]:
    """The catalog, batching loop and app over a loaded engine; closed (switcher unloaded) on exit."""
    catalog = Catalog(recipe, engine, switcher)
    loop = BatchLoop(engine)
    try:
        yield create_app(loop, catalog, recipe.generation), loop, catalog
    finally:
        loop.close()
        catalog.close()


def serve_command(recipe: Recipe, switcher: Optional[str] = None, host: str = "127.0.0.1", port: str = "8000") -> None:
    """``toolkit serve``: load the pool (and the switcher) and serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError("toolkit serve needs FastAPI and uvicorn: pip install 'switchkit[serve]'") from None
    if switcher and not Path(switcher).expanduser().exists():
        raise ConfigError(f"switcher={switcher} does not exist: give an exported switcher folder")
    if not str(port).isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"port={port} is not a port number: give an integer in 1..65535")
    try:
        with socket.create_server((host, int(port))):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another port=N or host=") from None
    from .models import check_sources, load_pool

    check_sources(recipe.pool)
    check_names(recipe)
    if serves_switch(recipe, switcher):
        check_policy(recipe, "trained", switcher)
    engine = SwitchEngine(load_pool(recipe.pool, recipe.generation.backend), recipe.generation)
    with serving(recipe, engine, switcher) as (app, _, catalog):
        if catalog.note:
            print(f"serve: {catalog.note}")
        print(f"serve: models {', '.join(catalog.names)} at http://{host}:{port}/v1 (Ctrl-C stops)")
        uvicorn.run(app, host=host, port=int(port), log_level="info")
