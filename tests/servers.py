"""A real OpenAI-compatible server for tests: an engine over a tiny model served by `omniserve serve`'s own server on
a port the OS chose, with a tiny word-level tokenizer so that text prompts and chat work. The fixtures built from it
(tiny_chat_model, server, slo_server) are in conftest.py."""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import ExitStack, contextmanager

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from omniserve.engine.llm_engine import LLMEngine
from omniserve.entrypoints.openai.api_server import build_app, listen_socket, make_server
from omniserve.profiler import profiled_latency_model

PROMPT = "the capital of france is"
MESSAGES = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "hello world"}]


def save_tiny_tokenizer(folder, vocab_size: int = 1000) -> None:
    """A word-level tokenizer covering every id of the tiny model (BOS 1, EOS 2), with a ChatML-like template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = ("the capital of france is paris hello world a an and to in on user assistant system you are terse "
             "what write haiku about sea . , ! ?").split()
    vocab = specials + words + [f"w{i}" for i in range(vocab_size - len(specials) - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    fast.save_pretrained(folder)


class RunningServer:
    """The server of `omniserve serve` (uvicorn, draining on SIGTERM) serving an app on a thread of its own, on a
    port the OS chose."""

    def __init__(self, app, server: uvicorn.Server | None = None) -> None:
        self.app = app
        if server is not None:
            self.server = server
        elif hasattr(app.state, "server"):
            self.server = make_server(app, log_level="warning")
        else:  # a stand-in app (test_bench's broken server)
            self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        sock = listen_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.server.config.timeout_keep_alive = 60  # idle connections stay open for a test (uvicorn's default: 5 s)
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    @property
    def state(self):
        return self.app.state.server

    @property
    def engine(self) -> LLMEngine:
        return self.state.engine

    @property
    def engines(self) -> list[LLMEngine]:
        return [self.engine]

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        content = body if isinstance(body, str) else json.dumps(body)
        headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 60)
        return httpx.post(self.url + path, content=content, headers=headers, **kwargs)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until the engine holds no request and no page (aborts land at the engine thread's next turn)."""
        deadline = time.monotonic() + timeout_s
        while self.engine.has_unfinished_requests() or self.engine.allocator.num_used:
            assert time.monotonic() < deadline, "the engine still holds requests"
            time.sleep(0.01)
        self.engine.check_integrity()

    def drain(self) -> None:
        """What SIGTERM does (a second call: what a second SIGTERM does)."""
        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self, timeout_s: float = 60) -> None:
        """Drains, and waits until the server has stopped."""
        self.drain()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive()


@contextmanager
def serving(model: str, names=("tiny",), api_keys=None, grace_s: float = 5, limits=None, batch_db=None,
            batch_limits=None, router_key=None, **engine_args):
    engine = LLMEngine(model=model, block_size=4, latency_model=profiled_latency_model, **engine_args)
    server = RunningServer(build_app(engine, list(names), api_keys, drain_grace_s=grace_s, limits=limits,
                                     batch_db=batch_db, batch_limits=batch_limits, router_key=router_key))
    try:
        yield server
    finally:
        server.stop()
    engine.check_integrity()
    assert engine.allocator.num_used == 0


ROUTER_KEY = "router-key-for-tests"
"""The key a router hands its instances (`serve --instances` makes a random one at start)."""


class RoutedServers(RunningServer):
    """The router of `serve --instances` (it keeps the batches) in front of servers of `serving`, all in this
    process: the single server's tests run against it unchanged. Its drain drains the servers, as the router's
    drains its instances."""

    def __init__(self, router_app, servers: list[RunningServer]) -> None:
        from omniserve.scaleout.router import DrainingRouter, router_config

        self.servers = servers
        router = router_app.state.router
        super().__init__(router_app, DrainingRouter(router_config(router_app, "warning"), router, self._drain_servers))

    def _drain_servers(self) -> None:
        for server in self.servers:
            server.drain()
        for server in self.servers:
            server.thread.join(60)

    @property
    def engine(self) -> LLMEngine:
        """The first server's engine (each server's: `engines`)."""
        return self.servers[0].engine

    @property
    def engines(self) -> list[LLMEngine]:
        return [server.engine for server in self.servers]

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        for server in self.servers:
            server.wait_idle(timeout_s)


@contextmanager
def routed_serving(model: str, names=("tiny",), api_keys=None, grace_s: float = 5, limits=None, batch_db=None,
                   batch_limits=None, instances: int = 2, **engine_args):
    """As `serving`, with a router in front of `instances` servers."""
    from omniserve.entrypoints.openai.serving import RequestLimits
    from omniserve.scaleout.router import Router, build_router_app

    with ExitStack() as servers:
        running = [servers.enter_context(serving(model, names, api_keys, grace_s, limits, router_key=ROUTER_KEY,
                                                 **engine_args)) for _ in range(instances)]
        router = Router([server.url for server in running], poll_interval_s=0.1, limits=limits or RequestLimits())
        router.drain_grace_s = grace_s
        routed = RoutedServers(build_router_app(router, api_keys, batch_db, batch_limits, ROUTER_KEY), running)
        try:
            yield routed
        finally:
            routed.stop()


@contextmanager
def slow_engine(server: RunningServer, seconds_per_step: float = 0.01):
    """Makes every engine iteration last at least this long, so that a request is still running when the test acts."""
    steps = {}
    for engine in server.engines:
        step = steps[engine] = engine.run_iteration

        def slow_step(step=step):
            time.sleep(seconds_per_step)
            return step()

        engine.run_iteration = slow_step
    try:
        yield
    finally:
        for engine in steps:
            del engine.run_iteration


def metric_samples(server: RunningServer) -> dict[tuple[str, tuple], float]:
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text) for s in family.samples
    }


def assert_serves(server: RunningServer) -> None:
    """The server still answers a normal request."""
    done = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                              extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 3 and done.choices[0].finish_reason == "length"
