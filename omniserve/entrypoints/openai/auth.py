"""API keys, and which service classes each key may use.

`--api-key KEY` (repeatable) admits a key to every class. A keys file (`--api-keys-file`, TOML or YAML) limits keys
to classes:

    [keys]                                   keys:
    "sk-chat-team" = ["ls", "be"]              sk-chat-team: [ls, be]
    "sk-nightly-batch" = ["be"]                sk-nightly-batch: [be]

Clients send the key as `Authorization: Bearer KEY` (what the OpenAI client does with `api_key=`).
"""

from __future__ import annotations

import hmac
from pathlib import Path

from omniserve.config import ConfigError, load_config_table
from omniserve.sampling.params import ServiceClass

ALL_CLASSES = frozenset(ServiceClass)


class APIKeys:
    def __init__(self, keys: dict[str, frozenset[ServiceClass]]) -> None:
        if not keys:
            raise ConfigError("no API keys given")
        self._keys = [(key.encode(), classes) for key, classes in keys.items()]

    @classmethod
    def build(cls, api_keys: list[str] | None = None, keys_file: str | None = None) -> "APIKeys | None":
        """None when neither is given: the server is open."""
        keys: dict[str, frozenset[ServiceClass]] = {}
        for key in api_keys or []:
            if not key:
                raise ConfigError("an API key cannot be empty")
            keys[key] = ALL_CLASSES
        if keys_file is not None:
            keys.update(load_keys_file(keys_file))
        return cls(keys) if keys else None

    def classes_for(self, authorization: str | None) -> frozenset[ServiceClass] | None:
        """The classes the request's key may use; None if the header holds no valid key."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        candidate = token.strip().encode()
        found = None
        for key, classes in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(candidate, key):
                found = classes
        return found


def load_keys_file(path: str | Path) -> dict[str, frozenset[ServiceClass]]:
    entries = load_config_table(path, "keys", "API keys file")
    keys = {}
    for key, classes in entries.items():
        classes = [classes] if isinstance(classes, str) else classes
        try:
            keys[str(key)] = frozenset(ServiceClass(c) for c in classes)
        except (TypeError, ValueError):
            raise ConfigError(f"API key {str(key)[:6]}...: classes must be a list of 'ls' and 'be', got "
                              f"{classes!r}") from None
        if not keys[str(key)]:
            raise ConfigError(f"API key {str(key)[:6]}... may use no class")
    return keys
