"""``qrm serve`` end to end: real servers on 127.0.0.1 (a free port), real HTTP clients (httpx).

* /v1/score's credits equal ``qrm eval-rm --dump-token-scores`` for the same pairs (Q-RM, ORM, LoRA DPO-RM);
  /get_reward (OpenRLHF's format) gives the same sequence scores; token spans spell the response;
* TP=2 under torchrun equals TP=1;
* every bad input gets its 4xx JSON error naming the field, and the next good request succeeds; the API
  key is enforced; truncation only on request (and it keeps the causal prefix's credits);
* SIGTERM with requests in flight answers them all (one process, and torchrun with a follower rank);
* 32 concurrent clients x 20 requests of mixed lengths: no errors, responses equal to one-at-a-time;
* /metrics counts what was sent;
* the verl adapter: token-level rewards aligned to the policy's tokens (same tokenizer: the credits
  themselves; another tokenizer: the credit of the reward-model token covering each token's last character,
  checked against a per-character oracle), through verl's own DataProto when verl is importable.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from helpers_tokenizers import make_hf_tokenizer_dir, sample_texts  # noqa: E402
from launch import REPO, _env, free_port  # noqa: E402

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TRAIN = ["--micro-batch-size", "16", "--global-batch-size", "16", "--train-iters", "3", "--lr", "3e-3",
         "--no-tensorboard"]
CASES = {"qrm": ["--reward-loss", "qrm"], "orm": ["--reward-loss", "orm"],
         "dpo_lora": ["--reward-loss", "dpo", "--lora-rank", "8"]}
START_TIMEOUT = 300


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(qrm_data, tiny_flags, qrm_batch, tmp_path_factory):
    """A tiny Q-RM, ORM and LoRA DPO-RM (3 steps each) and eval-rm's token dumps of the 64 pairs."""
    out = tmp_path_factory.mktemp("serve")
    base = ["--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags, *TRAIN]
    runs = []
    for name, extra in CASES.items():
        runs.append(["train-rm", *base, "--save", out / name, *extra])
        runs.append(["eval-rm", "--load", out / name, "--data", qrm_data.pairs, "--output", out / f"{name}.json",
                     "--dump-token-scores", out / f"{name}_tokens.jsonl"])
    qrm_batch(runs)
    dumps = {}
    for name in CASES:
        with open(out / f"{name}_tokens.jsonl") as f:
            dumps[name] = [json.loads(line) for line in f]
    return {"dir": out, "dumps": dumps}


class Server:
    """``qrm serve`` in a subprocess of its own session (one process, or torchrun with ``nproc``)."""

    def __init__(self, args: list, nproc: int = 1, log_path=None):
        self.port, self.nproc = free_port(), nproc
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = ["-m", "megatron_qrm", "serve", *map(str, args), "--port", str(self.port)]
        if nproc > 1:
            cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), *cmd]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *cmd], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=_env(), cwd=REPO, start_new_session=True)
        deadline = time.time() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"qrm serve exited {self.proc.returncode} before serving:\n{self.log()[-6000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"qrm serve did not answer /health in {START_TIMEOUT}s:\n{self.log()[-6000:]}")
            time.sleep(0.3)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM (the process torchrun or qrm serve) and wait for the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        try:  # the session this test started: torchrun's workers too, even when torchrun has exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(30)
        self._log.close()


@pytest.fixture(scope="module")
def qrm_server(trained):
    srv = Server(["--load", trained["dir"] / "qrm", "--api-key", API_KEY, "--max-body-bytes", "65536",
                  "--max-items", "200", "--max-wait-ms", "5"], log_path=trained["dir"] / "qrm_serve.log")
    yield srv
    srv.kill()


def post(url: str, path: str, body=None, raw: bytes = None, headers=AUTH) -> httpx.Response:
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={**headers, "Content-Type": "application/json"},
                          timeout=120)
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def pair_items(qrm_data, dump: list[dict]) -> list[dict]:
    """The eval-rm dump's rows as /v1/score items (from the source records: the dump's prompt is decoded)."""
    return [{"prompt": qrm_data.rows[r["index"]]["instruction"], "response": qrm_data.rows[r["index"]][r["side"]]}
            for r in dump]


def score(url: str, items: list[dict], chunk: int = 64, **flags) -> list[dict]:
    out = []
    for k in range(0, len(items), chunk):
        r = post(url, "/v1/score", {"items": items[k:k + chunk], **flags})
        assert r.status_code == 200, r.text
        out += r.json()["results"]
    return out


def assert_matches_dump(results: list[dict], dump: list[dict], kind: str) -> None:
    assert len(results) == len(dump)
    for res, row in zip(results, dump):
        assert len(res["credits"]) == len(row["scores"]) == res["num_tokens"]
        np.testing.assert_allclose(res["credits"], row["scores"], atol=1e-5, rtol=0)
        expected = {"qrm": np.mean, "orm": lambda s: s[-1], "dpo": np.sum}[kind](np.asarray(row["scores"]))
        assert res["score"] == pytest.approx(expected, abs=1e-5)
        # the spans spell the response; the last token is the EOS with an empty span at the end
        text = res["response_text"]
        assert [text[s:e] for s, e in res["offsets"][:-1]] == res["tokens"][:-1]
        assert "".join(res["tokens"][:-1]) == text
        assert res["offsets"][-1] == [len(text), len(text)]


# ---------------------------------------------------------------------------------------------- scores
def test_score_equals_eval_rm_token_dump(trained, qrm_server, qrm_data):
    dump = trained["dumps"]["qrm"]
    results = score(qrm_server.url, pair_items(qrm_data, dump))
    assert_matches_dump(results, dump, "qrm")
    # the responses are whitespace-separated numbers, which this tokenizer spells back exactly
    assert [r["response_text"] for r in results] == [it["response"] for it in pair_items(qrm_data, dump)]


def test_get_reward_openrlhf_format(trained, qrm_server, qrm_data):
    dump = trained["dumps"]["qrm"][:32]
    items = pair_items(qrm_data, dump)
    # OpenRLHF sends prompt + response as the policy decoded it, often with the EOS text left on
    # (decoded with special tokens: left padding, EOS, right padding)
    queries = [("<pad>" * (k % 3)) + it["prompt"] + it["response"] + ("</s><pad>" if k % 2 else "")
               for k, it in enumerate(items)]
    r = post(qrm_server.url, "/get_reward", {"query": queries, "prompts": [it["prompt"] for it in items],
                                             "labels": [""] * len(items)})
    assert r.status_code == 200, r.text
    rewards = r.json()["rewards"]
    np.testing.assert_allclose(rewards, [row["mean_score"] for row in dump], atol=1e-5, rtol=0)


def test_standardized_credits(trained, qrm_server, qrm_data):
    items = pair_items(qrm_data, trained["dumps"]["qrm"][:10])
    res = score(qrm_server.url, items, standardize=True)
    flat = np.concatenate([r["credits"] for r in res])
    for r in res:
        np.testing.assert_allclose(r["standardized_credits"], (np.asarray(r["credits"]) - flat.mean()) / flat.std(),
                                   atol=1e-9)


def test_truncate_on_request_keeps_the_prefix_credits(qrm_server, qrm_data):
    prompt = "Keep the even numbers: 2 4 6"
    long_response = " " + " ".join(str(2 + 2 * (k % 19)) for k in range(120))
    r = post(qrm_server.url, "/v1/score", {"items": [{"prompt": prompt, "response": long_response}]})
    assert r.status_code == 413 and r.json()["error"]["field"] == "items[0].response"
    (cut,) = score(qrm_server.url, [{"prompt": prompt, "response": long_response}], truncate=True)
    from megatron_qrm.data import load_tokenizer

    tok = load_tokenizer(qrm_data.tokenizer)
    prompt_len = len(tok.encode(prompt)) + (tok.bos_id is not None)
    assert cut["truncated"] and cut["num_tokens"] == 64 - prompt_len
    assert cut["token_ids"] == tok.encode(long_response)[:64 - prompt_len]  # cut from the end, EOS first
    # a causal model: the kept tokens' credits are those of a shorter response with the same first tokens
    short = " " + " ".join(str(2 + 2 * (k % 19)) for k in range(10))
    (ref,) = score(qrm_server.url, [{"prompt": prompt, "response": short}])
    n = len(ref["token_ids"]) - 1
    assert ref["token_ids"][:n] == cut["token_ids"][:n]
    np.testing.assert_allclose(cut["credits"][:n], ref["credits"][:n], atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
GOOD = {"items": [{"prompt": "Keep the even numbers: 3 4", "response": " 4"}]}
LONG = " " + " ".join(["12"] * 100)
BAD_INPUTS = {
    "malformed_json": ("/v1/score", b'{"items": [{"prompt": "a",', 400, "body"),
    "not_an_object": ("/v1/score", [1, 2], 422, "body"),
    "missing_items": ("/v1/score", {}, 422, "items"),
    "no_items": ("/v1/score", {"items": []}, 422, "items"),
    "missing_response": ("/v1/score", {"items": [{"prompt": "a"}]}, 422, "items[0].response"),
    "missing_prompt": ("/v1/score", {"items": [{"response": "a"}]}, 422, "items[0].prompt"),
    "non_string_response": ("/v1/score", {"items": [{"prompt": "a", "response": 5}]}, 422, "items[0].response"),
    "null_prompt_2nd": ("/v1/score", {"items": [GOOD["items"][0], {"prompt": None, "response": "x"}]}, 422,
                        "items[1].prompt"),
    "empty_response": ("/v1/score", {"items": [{"prompt": "a", "response": ""}]}, 422, "items[0].response"),
    "misspelt_field": ("/v1/score", {"items": [{"prompt": "a", "respons": "b"}]}, 422, "items[0].respons"),
    "non_bool_flag": ("/v1/score", {**GOOD, "standardize": "yes"}, 422, "standardize"),
    "too_many_items": ("/v1/score", {"items": [{"prompt": "a", "response": "b"}] * 201}, 413, "items"),
    "body_too_large": ("/v1/score", {"items": [{"prompt": "a" * 70000, "response": "b"}]}, 413, "body"),
    "too_long": ("/v1/score", {"items": [{"prompt": "a", "response": LONG}]}, 413, "items[0].response"),
    "prompt_too_long": ("/v1/score", {"items": [{"prompt": LONG, "response": " 2"}], "truncate": True}, 413,
                        "items[0].prompt"),
    "chat_without_template": ("/v1/score", {"items": [{"messages": [{"role": "user", "content": "a"},
                                                                    {"role": "assistant", "content": "b"}]}]},
                              422, "items[0].messages"),
    "chat_last_not_assistant": ("/v1/score", {"items": [{"messages": [{"role": "user", "content": "a"},
                                                                      {"role": "user", "content": "b"}]}]},
                                422, "items[0].messages"),
    "reward_no_prompts": ("/get_reward", {"query": ["a b"]}, 422, "prompts"),
    "reward_prompt_count": ("/get_reward", {"query": ["a b"], "prompts": ["a", "b"]}, 422, "prompts"),
    "reward_prompt_not_prefix": ("/get_reward", {"query": ["a b"], "prompts": ["x"]}, 422, "query[0]"),
    "reward_non_string": ("/get_reward", {"query": [1], "prompts": ["x"]}, 422, "query[0]"),
    "reward_too_long": ("/get_reward", {"query": ["a" + LONG], "prompts": ["a"]}, 413, "query[0]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_naming_the_field_then_serving_goes_on(qrm_server, case):
    path, body, status, field = BAD_INPUTS[case]
    r = post(qrm_server.url, path, raw=body) if isinstance(body, bytes) else post(qrm_server.url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["status"] == status and err["message"]
    good = post(qrm_server.url, "/v1/score", GOOD)
    assert good.status_code == 200 and len(good.json()["results"][0]["credits"]) == 2


def test_api_key_is_enforced(qrm_server):
    assert post(qrm_server.url, "/v1/score", GOOD, headers={}).status_code == 401
    wrong = post(qrm_server.url, "/v1/score", GOOD, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["field"] == "Authorization"
    assert post(qrm_server.url, "/get_reward", {"query": ["a b"], "prompts": ["a"]}, headers={}).status_code == 401
    assert httpx.get(qrm_server.url + "/metrics").status_code == 401
    assert httpx.get(qrm_server.url + "/health").status_code == 200  # liveness probes need no key
    assert post(qrm_server.url, "/v1/score", GOOD).status_code == 200


def test_binds_loopback_by_default():
    from megatron_qrm.cli import build_parser

    args = build_parser().parse_args(["serve", "--load", "x"])
    assert args.host == "127.0.0.1" and args.api_key is None


# ---------------------------------------------------------------------------------------------- metrics
def _metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_count_requests_errors_batches_and_tokens(qrm_server, qrm_data):
    from megatron_qrm.data import load_tokenizer

    tok = load_tokenizer(qrm_data.tokenizer)
    get = lambda: httpx.get(qrm_server.url + "/metrics", headers=AUTH).text  # noqa: E731
    before = get()
    items = [{"prompt": f"Keep the even numbers: {k} 8", "response": " 8" * (k + 1)} for k in range(5)]
    for it in items:
        assert post(qrm_server.url, "/v1/score", {"items": [it]}).status_code == 200
    assert post(qrm_server.url, "/v1/score", {"items": []}).status_code == 422
    after = get()
    delta = lambda name, **lb: _metric(after, name, **lb) - _metric(before, name, **lb)  # noqa: E731
    assert delta("qrm_requests_total", endpoint="/v1/score", status="200") == 5
    assert delta("qrm_request_errors_total", endpoint="/v1/score", status="422") == 1
    assert delta("qrm_request_latency_seconds_count", endpoint="/v1/score") == 6
    assert delta("qrm_scored_items_total") == 5
    tokens = sum(len(tok.encode(it["prompt"])) + (tok.bos_id is not None) + len(tok.encode(it["response"])) + 1
                 for it in items)
    assert delta("qrm_scored_tokens_total") == tokens
    assert delta("qrm_batch_size_items_count") == 5  # one at a time: five batches of one
    assert "qrm_tokens_per_second" in after


# ---------------------------------------------------------------------------------------------- stalled / gone clients
import socket  # noqa: E402


def _half_body(url: str, path: str = "/v1/score", declared: int = 4000, sent: int = 100) -> socket.socket:
    """A raw client that sends the headers of a ``declared``-byte JSON body and ``sent`` bytes of it."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n")
    s.sendall(head.encode() + b'{"items": [' + b" " * (sent - 11))
    return s


def test_client_disconnect_mid_body_is_not_a_server_error(qrm_server):
    """Clients that hang up halfway through their body: no traceback in the log, no 500 in /metrics, a
    disconnect counted as such; the server goes on serving."""
    get = lambda: httpx.get(qrm_server.url + "/metrics", headers=AUTH).text  # noqa: E731
    before = get()
    for path in ("/v1/score", "/get_reward"):
        for _ in range(3):
            s = _half_body(qrm_server.url, path)
            time.sleep(0.05)
            s.close()
    deadline = time.time() + 30
    while _metric(get(), "qrm_client_disconnects_total") - _metric(before, "qrm_client_disconnects_total") < 6:
        assert time.time() < deadline, get()
        time.sleep(0.1)
    after = get()
    assert _metric(after, "qrm_request_errors_total", status="500") == _metric(before, "qrm_request_errors_total",
                                                                              status="500")
    assert _metric(after, "qrm_client_disconnects_total", endpoint="/v1/score") - \
        _metric(before, "qrm_client_disconnects_total", endpoint="/v1/score") == 3
    assert post(qrm_server.url, "/v1/score", GOOD).status_code == 200
    log = qrm_server.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log and "ClientDisconnect" not in log, log[-4000:]


def test_sigterm_with_a_stalled_client_exits_within_the_grace_period(trained, qrm_data):
    """A client sends headers and half a body, then stalls; another request is queued. SIGTERM: the queued
    request is answered, and the server exits within --graceful-timeout (+ the model's teardown) whatever the
    stalled client does; the default grace period is at most 15 s."""
    from megatron_qrm.cli import build_parser

    assert 0 < build_parser().parse_args(["serve", "--load", "x"]).graceful_timeout <= 15
    dump = trained["dumps"]["qrm"]
    srv = Server(["--load", trained["dir"] / "qrm", "--api-key", API_KEY, "--max-wait-ms", "3000",
                  "--graceful-timeout", "3"], log_path=trained["dir"] / "stalled_serve.log")
    stalled = None
    try:
        stalled = _half_body(srv.url)
        answers: list = []
        sender = threading.Thread(target=lambda: answers.append(
            post(srv.url, "/v1/score", {"items": pair_items(qrm_data, dump)[:1]})))
        sender.start()
        deadline = time.time() + 60
        while _metric(httpx.get(srv.url + "/metrics", headers=AUTH).text, "qrm_requests_in_flight") < 3:
            assert time.time() < deadline, "the requests never were in flight together"
            time.sleep(0.01)
        t0 = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(60)
        elapsed = time.time() - t0
        sender.join(30)
    finally:
        if stalled is not None:
            stalled.close()
        srv.kill()
    assert rc == 0, srv.log()[-4000:]
    assert elapsed < 3 + 10, f"exited {elapsed:.1f} s after SIGTERM with --graceful-timeout 3"
    assert answers and answers[0].status_code == 200, answers
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


# ---------------------------------------------------------------------------------------------- load
def _load_requests(qrm_data) -> list[dict]:
    """64 distinct requests of 1-3 items with responses of 1 to ~40 tokens."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(64):
        items = []
        for _ in range(int(rng.integers(1, 4))):
            row = qrm_data.rows[int(rng.integers(len(qrm_data.rows)))]
            reps = int(rng.choice([1, 1, 2, 5]))
            items.append({"prompt": row["instruction"], "response": row["chosen"] * reps})
        out.append({"items": items})
    return out


def test_load_32_clients_x_20_requests_equal_one_at_a_time(qrm_server, qrm_data):
    requests = _load_requests(qrm_data)
    sequential = []
    with httpx.Client(base_url=qrm_server.url, headers=AUTH, timeout=120) as client:
        for body in requests:
            r = client.post("/v1/score", json=body)
            assert r.status_code == 200, r.text
            sequential.append(r.json()["results"])
        before = client.get("/metrics").text

    async def one_client(c: int, client: httpx.AsyncClient) -> list[tuple[int, int, dict]]:
        got = []
        for k in range(20):
            idx = (c * 20 + k) % len(requests)
            r = await client.post("/v1/score", json=requests[idx])
            got.append((idx, r.status_code, r.json()))
        return got

    async def run_all():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=qrm_server.url, headers=AUTH, timeout=120, limits=limits) as client:
            parts = await asyncio.gather(*(one_client(c, client) for c in range(32)))
        return [x for part in parts for x in part]

    t0 = time.time()
    answers = asyncio.run(asyncio.wait_for(run_all(), timeout=600))
    elapsed = time.time() - t0
    assert len(answers) == 640
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    for idx, _, body in answers:
        for got, ref in zip(body["results"], sequential[idx], strict=True):
            assert got["token_ids"] == ref["token_ids"] and got["offsets"] == ref["offsets"]
            assert got["tokens"] == ref["tokens"]
            # other batch companions and padding: the same numbers up to float32 summation order
            np.testing.assert_allclose(got["credits"], ref["credits"], atol=1e-5, rtol=0)
    after = httpx.get(qrm_server.url + "/metrics", headers=AUTH).text
    batches = _metric(after, "qrm_batch_size_items_count") - _metric(before, "qrm_batch_size_items_count")
    items = _metric(after, "qrm_batch_size_items_sum") - _metric(before, "qrm_batch_size_items_sum")
    assert items == sum(len(requests[i]["items"]) for i, _, _ in answers)
    assert batches < items, "concurrent requests were never batched together"
    print(f"load: 640 requests in {elapsed:.1f}s, {items / batches:.1f} sequences per batch")


# ---------------------------------------------------------------------------------------------- TP / SIGTERM
def _sigterm_with_requests_in_flight(srv: Server, items: list[dict], n: int = 12) -> list:
    """Send ``n`` requests at once (one asyncio client), SIGTERM the server once all of them are in flight
    (its long --max-wait-ms holds them in the queue), return their answers (responses or exceptions)."""
    answers: list = []

    async def burst():
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as client:
            answers.extend(await asyncio.gather(
                *(client.post("/v1/score", json={"items": [items[k % len(items)]]}) for k in range(n)),
                return_exceptions=True))

    sender = threading.Thread(target=lambda: asyncio.run(burst()))
    sender.start()
    deadline = time.time() + 60
    while True:  # the /metrics request itself is in flight too
        text = httpx.get(srv.url + "/metrics", headers=AUTH, timeout=30).text
        if _metric(text, "qrm_requests_in_flight") >= n + 1:
            break
        assert time.time() < deadline and sender.is_alive(), f"the requests never were in flight together: {answers}"
        time.sleep(0.01)
    rc = srv.terminate()
    sender.join(120)
    # torchrun itself exits 1 on a SIGTERM (SignalException) after its workers have ended
    assert rc == 0 or (srv.nproc > 1 and rc == 1), srv.log()[-4000:]
    assert "qrm serve: stopped" in srv.log(), srv.log()[-4000:]
    assert len(answers) == n
    return answers


def test_tp2_serving_equals_tp1_and_sigterm_answers_in_flight(trained, qrm_server, qrm_data):
    dump = trained["dumps"]["qrm"]
    items = pair_items(qrm_data, dump)
    # a long wait bound keeps the SIGTERM test's requests queued while the signal arrives (and the 128
    # items to compare go in one request, one wait)
    srv = Server(["--load", trained["dir"] / "qrm", "--tensor-model-parallel-size", "2", "--api-key", API_KEY,
                  "--max-wait-ms", "8000"], nproc=2, log_path=trained["dir"] / "qrm_tp2_serve.log")
    try:
        tp2 = score(srv.url, items, chunk=128)
        tp1 = score(qrm_server.url, items)
        for a, b in zip(tp2, tp1, strict=True):
            assert a["token_ids"] == b["token_ids"]
            np.testing.assert_allclose(a["credits"], b["credits"], atol=1e-5, rtol=0)
        assert_matches_dump(tp2, dump, "qrm")
        answers = _sigterm_with_requests_in_flight(srv, items)
    finally:
        srv.kill()
    assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers
    for k, a in enumerate(answers):
        np.testing.assert_allclose(a.json()["results"][0]["credits"], tp1[k]["credits"], atol=1e-5)


@pytest.mark.parametrize("name,kind", [("orm", "orm"), ("dpo_lora", "dpo")])
def test_orm_and_dpo_checkpoints_and_sigterm(trained, qrm_data, name, kind):
    dump = trained["dumps"][name]
    srv = Server(["--load", trained["dir"] / name, "--api-key", API_KEY, "--max-wait-ms", "8000"],
                 log_path=trained["dir"] / f"{name}_serve.log")
    try:
        assert httpx.get(srv.url + "/health").json()["kind"] == kind
        assert_matches_dump(score(srv.url, pair_items(qrm_data, dump), chunk=128), dump, kind)
        answers = _sigterm_with_requests_in_flight(srv, pair_items(qrm_data, dump))
    finally:
        srv.kill()
    assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers


# ---------------------------------------------------------------------------------------------- verl adapter
class _Batch:
    """What verl's reward managers read from a DataProto: ``.batch[name]`` tensors."""

    def __init__(self, tensors: dict):
        self.batch = tensors


def _verl_tensors(tok_encode, eos_id: int, pad_id: int, prompts: list[str], responses: list[str],
                  finished: list[bool], bos: list[int]):
    """verl's layout: prompts left-padded [B, P], responses right-padded [B, R], attention_mask [B, P + R]."""
    import torch

    p_ids = [bos + tok_encode(p) for p in prompts]
    r_ids = [tok_encode(r) + ([eos_id] if f else []) for r, f in zip(responses, finished)]
    P, R = max(map(len, p_ids)), max(map(len, r_ids)) + 2
    prompts_t = torch.full((len(p_ids), P), pad_id)
    responses_t = torch.full((len(p_ids), R), pad_id)
    mask = torch.zeros(len(p_ids), P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        prompts_t[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):P] = 1
        responses_t[i, :len(r)] = torch.tensor(r)
        mask[i, P:P + len(r)] = 1
    return {"prompts": prompts_t, "responses": responses_t, "attention_mask": mask}, p_ids, r_ids


VERL_PROMPTS = ["Keep the even numbers: 31 23 28 26 18", "Keep the even numbers: 3 4 8", "Sort ascending: 5 2 9",
                "Keep the even numbers: 1 2"]
VERL_RESPONSES = [" 28 26 18", " 4 8 and more words here", " 2 5 9", ""]
VERL_FINISHED = [True, False, True, True]


def test_verl_rewards_with_the_reward_models_tokenizer_are_its_credits(qrm_server, qrm_data):
    from megatron_qrm.data import load_tokenizer
    from megatron_qrm.serving.client import QRMClient
    from megatron_qrm.serving.verl_adapter import token_level_rewards

    tok = load_tokenizer(qrm_data.tokenizer)
    tensors, p_ids, r_ids = _verl_tensors(tok.encode, tok.eos_id, tok.pad_id, VERL_PROMPTS, VERL_RESPONSES,
                                          VERL_FINISHED, [tok.bos_id])
    with QRMClient(qrm_server.url, api_key=API_KEY) as client:
        reward, scores = token_level_rewards(tensors["prompts"], tensors["responses"], tensors["attention_mask"],
                                             tok, client, eos_token_id=tok.eos_id)
        direct = client.score([{"prompt": p, "response": r} for p, r in zip(VERL_PROMPTS, VERL_RESPONSES) if r])
    assert reward.shape == tensors["responses"].shape and reward.dtype.is_floating_point
    k = 0
    for i, resp in enumerate(VERL_RESPONSES):
        n = len(r_ids[i])
        assert not reward[i, n:].any()  # nothing on padding
        if not resp:
            assert not reward[i].any() and scores[i] == 0.0  # an empty response: reward 0
            continue
        ref = direct[k]
        k += 1
        body = len(tok.encode(resp))
        np.testing.assert_allclose(reward[i, :body].numpy(), ref["credits"][:body], atol=1e-6)
        if VERL_FINISHED[i]:  # the stop token takes the EOS's credit
            assert reward[i, body].item() == pytest.approx(ref["credits"][-1], abs=1e-6)
        assert scores[i] == pytest.approx(ref["score"])


def _oracle_rewards(policy, rm_results, p_ids, r_ids, finished) -> np.ndarray:
    """Per policy token: the credit of the reward-model token whose span holds the token's last character
    (decoding every prefix in full); the stop token takes the EOS's credit."""
    R = max(map(len, r_ids)) + 2
    out = np.zeros((len(r_ids), R))
    k = 0
    for i, ids in enumerate(r_ids):
        body = ids[:-1] if finished[i] else ids
        if not body:
            continue
        res = rm_results[k]
        k += 1
        base = policy.decode(p_ids[i])
        text = policy.decode(p_ids[i] + body)[len(base):]
        assert text == res["response_text"]
        for t in range(len(body)):
            end = len(policy.decode(p_ids[i] + body[:t + 1])) - len(base)
            last_char = end - 1
            covering = [j for j, (s, e) in enumerate(res["offsets"][:-1]) if s <= last_char < e]
            out[i, t] = res["credits"][covering[0]]
        if finished[i]:
            out[i, len(body)] = res["credits"][-1]
    return out


@pytest.fixture(scope="module")
def policy_tokenizer(tmp_path_factory):
    """A byte-level BPE with another vocabulary than the reward model's SentencePiece (as verl passes it:
    a transformers tokenizer)."""
    from transformers import AutoTokenizer

    d = make_hf_tokenizer_dir(tmp_path_factory.mktemp("policy_tok"), with_chat_template=False,
                              texts=sample_texts(200, seed=3), vocab_size=300)
    return AutoTokenizer.from_pretrained(d, local_files_only=True)


def _policy_batch(policy):
    bos = [policy.bos_token_id] if policy.bos_token_id is not None else []
    return _verl_tensors(lambda s: policy(s, add_special_tokens=False)["input_ids"], policy.eos_token_id,
                         policy.pad_token_id if policy.pad_token_id is not None else policy.eos_token_id,
                         VERL_PROMPTS, VERL_RESPONSES, VERL_FINISHED, bos)


def test_verl_manager_retokenizes_for_another_policy_tokenizer(qrm_server, policy_tokenizer):
    import torch

    from megatron_qrm.serving.client import QRMClient
    from megatron_qrm.serving.verl_adapter import QRMRewardManager

    tensors, p_ids, r_ids = _policy_batch(policy_tokenizer)
    manager = QRMRewardManager(tokenizer=policy_tokenizer, server_url=qrm_server.url, api_key=API_KEY)
    out = manager(_Batch(tensors), return_dict=True)
    reward = out["reward_tensor"]
    with QRMClient(qrm_server.url, api_key=API_KEY) as client:  # what the server says for the same texts
        rm = client.score([(policy_tokenizer.decode(p_ids[i]), r) for i, r in enumerate(VERL_RESPONSES) if r],
                          prompts_rendered=True)
    expected = _oracle_rewards(policy_tokenizer, rm, p_ids, r_ids, VERL_FINISHED)
    np.testing.assert_allclose(reward.numpy(), expected[:, :reward.shape[1]], atol=1e-6)
    assert out["reward_extra_info"]["qrm_score"][0] == pytest.approx(rm[0]["score"])
    # the reward-loop interface: one sample at a time, then stacked into rm_scores
    single = [asyncio.run(manager.run_single(_Batch({k: v[i:i + 1] for k, v in tensors.items()})))
              for i in range(len(VERL_RESPONSES))]
    stacked = QRMRewardManager.assemble_rm_scores(_Batch(tensors), [s["reward_score"] for s in single])
    torch.testing.assert_close(stacked, reward, atol=1e-5, rtol=0)  # batched alone vs together: float order


def test_verl_dataproto_if_verl_is_importable(qrm_server, policy_tokenizer):
    import torch

    verl = pytest.importorskip("verl", reason="verl is not installed (pip install verl pulls ray, wandb, and "
                               "transformers<5.11); the adapter is tested against its documented contract above")
    from megatron_qrm.serving.verl_adapter import QRMRewardManager

    tensors, _, _ = _policy_batch(policy_tokenizer)
    data = verl.DataProto.from_dict(tensors=tensors)
    manager = QRMRewardManager(tokenizer=policy_tokenizer, server_url=qrm_server.url, api_key=API_KEY)
    reward = manager(data)
    reference = manager(_Batch(tensors))
    assert reward.shape == data.batch["responses"].shape
    assert (reward == reference).all()
    single = [asyncio.run(manager.run_single(data[i:i + 1])) for i in range(len(data))]
    stacked = QRMRewardManager.assemble_rm_scores(data, [s["reward_score"] for s in single])
    torch.testing.assert_close(stacked, reward, atol=1e-5, rtol=0)  # batched alone vs together: float order
    # verl's own loader, configured as docs/serving.md says (reward.reward_manager.source=importlib)
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import load_reward_manager

    import megatron_qrm.serving.verl_adapter as adapter

    os.environ["QRM_SERVER_URL"], os.environ["QRM_API_KEY"] = qrm_server.url, API_KEY
    try:
        for path in ("pkg://megatron_qrm.serving.verl_adapter", adapter.__file__):  # by module, by file path
            cfg = OmegaConf.create({"reward": {"reward_manager": {"source": "importlib", "name": "QRMRewardManager",
                                                                  "module": {"path": path}},
                                               "custom_reward_function": {"path": None}, "sandbox_fusion": None}})
            loaded = load_reward_manager(cfg, policy_tokenizer)
            assert type(loaded).__name__ == "QRMRewardManager"
            torch.testing.assert_close(loaded(data), reward)
    finally:
        del os.environ["QRM_SERVER_URL"], os.environ["QRM_API_KEY"]


# ---------------------------------------------------------------------------------------------- chat messages
def test_single_turn_chat_is_laid_out_like_chat_template_training(tmp_path):
    """A {messages} item renders with the tokenizer's chat template; a single user turn gives exactly the ids
    that training with --chat-template gives its instruction (PreferenceDataset), BOS handled alike."""
    from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, load_tokenizer
    from megatron_qrm.data.synthetic import parity_pairs, write_jsonl
    from megatron_qrm.serving.encoding import RequestEncoder

    tok = load_tokenizer(make_hf_tokenizer_dir(tmp_path, with_chat_template=True))
    rows = parity_pairs(4, seed=1)
    data = PreferenceDataset(PreferenceDataConfig(path=write_jsonl(str(tmp_path / "p.jsonl"), rows),
                                                  chat_template=True, seq_length=256), tok)
    enc = RequestEncoder(tok, 256, chat_template=True)
    for row, pair in zip(rows, data):
        msgs = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["chosen"]}]
        (from_chat,) = enc.encode([enc.render_messages(msgs[:-1])], [row["chosen"]], truncate=False)
        (from_prompt,) = enc.encode([enc.render_instruction(row["instruction"])], [row["chosen"]], truncate=False)
        assert from_chat.prompt_ids == from_prompt.prompt_ids == pair.prompt_ids
        assert from_chat.response_ids == pair.chosen_ids
    # multi-turn: the template's own rendering of the earlier turns, generation prompt appended
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    text, _ = enc.render_messages(turns)
    assert text == tok._tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
