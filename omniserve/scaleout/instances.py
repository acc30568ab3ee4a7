"""Engine instances as Ray actors: each builds an engine and serves the OpenAI API from its node (one per GPU when the
cluster has GPUs), and the router in front of them is the endpoint clients see.

    urls, actors = start_instances(EngineArgs(...), served_names, count=2)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import asdict

from omniserve.config import ConfigError
from omniserve.cpu_attention.remote import import_ray
from omniserve.engine import EngineArgs

logger = logging.getLogger(__name__)

_WILDCARDS = ("0.0.0.0", "::", "")  # every interface: the instance is reached at its node's address
_STOP_SLACK_S = 10.0  # after a drain's grace period: ending the streams left, closing connections, stopping the engine


class EngineServer:
    """The actor (wrapped by ray.remote in `start_instances`): one engine and its HTTP server on a free port."""

    def __init__(self, args: dict, served_names: list[str], api_keys=None, drain_grace_s: float = 30.0,
                 host: str = "127.0.0.1", limits=None, router_key: str | None = None) -> None:
        from omniserve.engine import LLMEngine
        from omniserve.entrypoints.openai import build_app, listen_socket
        from omniserve.entrypoints.openai.api_server import make_server
        from omniserve.profiler import profiled_latency_model

        ray = import_ray()
        engine = LLMEngine(EngineArgs(**args), latency_model=profiled_latency_model)
        app = build_app(engine, served_names, api_keys, drain_grace_s=drain_grace_s, limits=limits,
                        router_key=router_key)
        sock = listen_socket(host, 0)  # where the server's --host says, as the router's own listener
        address = ray.util.get_node_ip_address() if host in _WILDCARDS else host
        self.url = f"http://{address}:{sock.getsockname()[1]}"
        # The server of `omniserve serve` (it drains) runs in a thread of the actor: uvicorn leaves signals alone off
        # the main thread, so the router asks for the drain (`drain`). The engine has a thread of its own.
        self.drain_grace_s = drain_grace_s
        self.server = make_server(app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def address(self) -> str:
        return self.url

    def drain(self) -> bool:
        """Drains as `omniserve serve` does on SIGTERM (new requests 503, those in flight finish within the grace
        period or end with the `draining` error event) and stops; whether it stopped in time."""
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(self.drain_grace_s + _STOP_SLACK_S)
        return not self.thread.is_alive()


def start_instances(args: EngineArgs, served_names: list[str], count: int, api_keys=None,
                    drain_grace_s: float = 30.0, host: str = "127.0.0.1", limits=None,
                    router_key: str | None = None) -> tuple[list[str], list]:
    """Starts `count` engine instances on the connected Ray cluster (a GPU each when it has enough, else a CPU),
    each listening on `host` (the server's --host) with the server's request limits, and running batch lines for
    the router that has `router_key`; returns their URLs and actor handles once every one serves."""
    ray = import_ray()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1 and host not in _WILDCARDS and host.startswith(("127.", "localhost", "::1")):
        raise ConfigError(f"engine instances on the cluster's other nodes cannot be reached at {host}: pass --host "
                          "0.0.0.0 (every interface) or an address the nodes share")
    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    resources = {"num_gpus": 1} if gpus >= count else {"num_cpus": 1}
    if gpus < count and cpus < count:  # the actors would wait for resources forever, without a word
        raise ConfigError(f"{count} engine instances need {count} GPUs or CPUs; the Ray cluster has {gpus:g} GPUs "
                          f"and {cpus:g} CPUs")
    actor_class = ray.remote(**resources)(EngineServer)
    # Each instance starts its own remote CPU attention hosts, if any are asked for, from inside the cluster.
    actors = [actor_class.remote(asdict(args), served_names, api_keys, drain_grace_s, host, limits, router_key)
              for _ in range(count)]
    urls = ray.get([actor.address.remote() for actor in actors])
    logger.info("engine instances: %s", ", ".join(urls))
    return urls, actors


def drain_instances(actors: list) -> None:
    """Drains every instance at once (see EngineServer.drain) and waits until they have stopped; an instance lost
    meanwhile, or one that did not stop in time, is logged."""
    ray = import_ray()
    for actor, ref in [(actor, actor.drain.remote()) for actor in actors]:
        try:
            if not ray.get(ref):
                logger.warning("an engine instance did not stop within its drain's grace period")
        except Exception as exc:  # noqa: BLE001 - an actor already gone: nothing is left to drain
            logger.warning("an engine instance could not be drained: %r", exc)
        finally:
            ray.kill(actor)
