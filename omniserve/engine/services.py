"""Named services: what an operator promises each kind of traffic.

A service has a class (LS or BE) and, for LS, SLOs on time-to-first-token and time-per-output-token. One server can
host several services on one model, e.g. a chat service and a batch service, from a small TOML or YAML file:

    [services.chat]            # TOML              services:                      # YAML
    class = "ls"                                     chat: {class: ls, ttft_slo: 1.0, tpot_slo: 0.1}
    ttft_slo = 1.0                                   batch: {class: be}
    tpot_slo = 0.1
    [services.batch]
    class = "be"

Without a file there are two services, `ls` (with the SLOs of --ls-ttft-slo / --ls-tpot-slo) and `be`. A request
names its service, or gets the first service of its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omniserve.config import ConfigError, load_config_table
from omniserve.sampling.params import InvalidRequestError, ServiceClass


@dataclass(frozen=True)
class Service:
    name: str
    service_class: ServiceClass
    ttft_slo: float | None = None
    """Seconds from arrival to the first token; LS requests that cannot make it are rejected at admission."""
    tpot_slo: float | None = None
    """Seconds per output token after the first; bounds every iteration while such a request runs."""

    def __post_init__(self) -> None:
        for name in ("ttft_slo", "tpot_slo"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"service {self.name!r}: {name} must be positive seconds, got {value!r}")
        if self.service_class is ServiceClass.BE and (self.ttft_slo or self.tpot_slo):
            raise ConfigError(f"service {self.name!r} is best-effort: it cannot have SLOs")


class ServiceRegistry:
    def __init__(self, services: list[Service]) -> None:
        self.services = {s.name: s for s in services}
        if len(self.services) != len(services):
            raise ConfigError("service names must be unique")
        for service_class in ServiceClass:  # every class has a default service
            if not any(s.service_class is service_class for s in services):
                self.services[service_class.value] = Service(service_class.value, service_class)

    @classmethod
    def build(
        cls, ls_ttft_slo: float | None = None, ls_tpot_slo: float | None = None, path: str | None = None
    ) -> "ServiceRegistry":
        services = [Service("ls", ServiceClass.LS, ls_ttft_slo, ls_tpot_slo), Service("be", ServiceClass.BE)]
        if path is not None:
            if ls_ttft_slo is not None or ls_tpot_slo is not None:
                raise ConfigError("give the LS SLOs either as flags or in the services file, not both")
            services = load_services(path)
        return cls(services)

    def resolve(self, name: str | None, service_class: ServiceClass) -> Service:
        """The named service, or the first service of the class."""
        if name is None:
            return next(s for s in self.services.values() if s.service_class is service_class)
        if name not in self.services:
            raise InvalidRequestError(
                f"unknown service {name!r} (this server has: {', '.join(self.services)})", "service"
            )
        return self.services[name]

    @property
    def tightest_tpot_slo(self) -> float | None:
        slos = [s.tpot_slo for s in self.services.values() if s.tpot_slo is not None]
        return min(slos) if slos else None


def load_services(path: str | Path) -> list[Service]:
    entries = load_config_table(path, "services", "services file")
    services = []
    for name, entry in entries.items():
        entry = dict(entry or {})
        unknown = set(entry) - {"class", "ttft_slo", "tpot_slo"}
        if unknown:
            raise ConfigError(f"service {name!r}: unknown keys {sorted(unknown)} (known: class, ttft_slo, tpot_slo)")
        try:
            service_class = ServiceClass(entry.get("class", "ls"))
        except ValueError:
            raise ConfigError(f"service {name!r}: class must be 'ls' or 'be', got {entry.get('class')!r}") from None
        services.append(Service(str(name), service_class, entry.get("ttft_slo"), entry.get("tpot_slo")))
    return services
