"""Named services: files, flags, and how a request finds its class and SLOs."""

from __future__ import annotations

import pytest

from omniserve.config import ConfigError
from omniserve.engine.services import ServiceRegistry
from omniserve.sampling.params import InvalidRequestError, SamplingParams, ServiceClass

TOML = """
[services.chat]
class = "ls"
ttft_slo = 1.0
tpot_slo = 0.1

[services.batch]
class = "be"
"""

YAML = """
services:
  chat: {class: ls, ttft_slo: 2.0}
  fast: {class: ls, tpot_slo: 0.05}
"""


def test_services_from_toml_and_yaml(tmp_path):
    (tmp_path / "s.toml").write_text(TOML)
    registry = ServiceRegistry.build(path=str(tmp_path / "s.toml"))
    chat = registry.resolve("chat", ServiceClass.BE)  # the name decides the class
    assert (chat.service_class, chat.ttft_slo, chat.tpot_slo) == (ServiceClass.LS, 1.0, 0.1)
    assert registry.resolve(None, ServiceClass.BE).name == "batch"
    assert registry.resolve(None, ServiceClass.LS).name == "chat"
    (tmp_path / "s.yaml").write_text(YAML)
    registry = ServiceRegistry.build(path=str(tmp_path / "s.yaml"))
    assert registry.tightest_tpot_slo == 0.05
    assert registry.resolve(None, ServiceClass.BE).name == "be"  # a class the file lacks gets a default service


def test_flags_make_the_default_ls_service():
    registry = ServiceRegistry.build(ls_ttft_slo=0.5, ls_tpot_slo=0.02)
    ls = registry.resolve(None, ServiceClass.LS)
    assert (ls.name, ls.ttft_slo, ls.tpot_slo) == ("ls", 0.5, 0.02)
    assert registry.resolve(None, ServiceClass.BE).tpot_slo is None


@pytest.mark.parametrize("text, message", [
    ("[services.x]\nclass = 'gold'\n", "class must be"),
    ("[services.x]\nttft = 1\n", "unknown keys"),
    ("[services.x]\nclass = 'be'\ntpot_slo = 0.1\n", "best-effort"),
    ("[services.x]\ntpot_slo = -1\n", "positive"),
    ("[other]\n", "no `services` table"),
    ("[services\n", "does not parse"),
])
def test_bad_services_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        ServiceRegistry.build(path=str(path))


def test_flags_and_file_together_are_refused(tmp_path):
    (tmp_path / "s.toml").write_text(TOML)
    with pytest.raises(ConfigError, match="not both"):
        ServiceRegistry.build(ls_tpot_slo=0.1, path=str(tmp_path / "s.toml"))
    with pytest.raises(ConfigError, match="cannot read"):
        ServiceRegistry.build(path=str(tmp_path / "missing.toml"))


def test_unknown_service_is_a_request_error():
    with pytest.raises(InvalidRequestError, match="unknown service 'gold'") as info:
        ServiceRegistry.build().resolve("gold", ServiceClass.LS)
    assert info.value.param == "service"


def test_engine_puts_each_request_in_its_service(tiny_model_dirs, tmp_path, make_llm):
    (tmp_path / "s.toml").write_text("[services.batch]\nclass = 'be'\n[services.chat]\nclass = 'ls'\n")
    llm = make_llm(tiny_model_dirs["llama"][0], services=str(tmp_path / "s.toml"), be_decode_placement="device")
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(service="batch", max_tokens=2))
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=2))
    requests = engine.scheduler.requests
    assert (requests["a"].service, requests["a"].is_best_effort) == ("batch", True)
    assert (requests["b"].service, requests["b"].is_best_effort) == ("chat", False)
    with pytest.raises(InvalidRequestError, match="unknown service"):
        engine.add_request("c", [5], SamplingParams(service="gold"))
    while engine.has_unfinished_requests():
        engine.step()
