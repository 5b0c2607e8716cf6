"""
The ``twistd qbipc --config`` file: parsing and validation, without
Twisted.

The file is TOML; each ``[services.KEY]`` table declares one service::

    [services.echo]
    handler = "txqb.echo.EchoHandlers"   # dotted name of a factory
    name = "echo"                         # libqb service name (default: KEY)
    transport = "shm"                     # or "socket"
    max-message-size = 1048576
    allowed-uids = [0, "hacluster"]       # numbers or user names
    allowed-gids = ["haclient"]           # numbers or group names
    rate-limit = "normal"                 # fast, normal, slow, off, off_2
    file-owner = "hacluster"              # owner of the connection's files
    file-group = "haclient"
    file-mode = "0660"                    # octal string or 0o660

    [services.echo.handler-args]          # keyword arguments for the factory
    greeting = "hello"

Every problem is reported as one L{ConfigError} line naming the file.
"""

from __future__ import annotations

import grp
import importlib
import pwd
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional

from txqb._wire.naming import validateServiceName

__all__ = ["ConfigError", "ServiceConfig", "loadConfig", "parseConfig", "resolveName", "RATE_NAMES"]

RATE_NAMES = ("fast", "normal", "slow", "off", "off_2")
"""Rate limits by name, in the order of libqb's ``QB_IPCS_RATE_*`` values."""

TRANSPORTS = ("socket", "shm")


_KEYS = frozenset(
    {
        "handler",
        "handler-args",
        "name",
        "transport",
        "max-message-size",
        "allowed-uids",
        "allowed-gids",
        "rate-limit",
        "file-owner",
        "file-group",
        "file-mode",
    }
)


class ConfigError(ValueError):
    """A configuration file cannot be used; C{str()} is one line naming it."""


@dataclass(frozen=True)
class ServiceConfig:
    """One declared service, validated; ids are numeric, names resolved."""

    key: str
    """The table name: what ``--service`` names."""
    name: str
    """The libqb service name clients connect to."""
    handler: str
    """The dotted name of the handlers' factory, as written."""
    factory: Callable[..., Any]
    """The factory itself: called with L{handlerArgs} to make the handlers."""
    handlerArgs: Mapping[str, Any] = field(default_factory=dict)
    transport: Optional[str] = None
    maxMessageSize: Optional[int] = None
    allowedUids: Optional[FrozenSet[int]] = None
    allowedGids: Optional[FrozenSet[int]] = None
    rateLimit: Optional[str] = None
    fileOwner: Optional[int] = None
    fileGroup: Optional[int] = None
    fileMode: Optional[int] = None

    def allows(self, uid: int, gid: int) -> bool:
        """
        The accept policy: with neither list set everyone may connect;
        otherwise a client whose uid or gid is listed.
        """
        if self.allowedUids is None and self.allowedGids is None:
            return True
        return uid in (self.allowedUids or ()) or gid in (self.allowedGids or ())


def _oneLine(text: str) -> str:
    return " ".join(str(text).split())


def resolveName(dotted: str) -> Any:
    """
    The object a dotted Python name (``package.module.Attribute``) names.

    @raise ValueError: with a one-line reason.
    """
    parts = dotted.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"{dotted!r} is not a dotted Python name (module.attribute)")
    for cut in range(len(parts) - 1, 0, -1):
        moduleName = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(moduleName)
        except ModuleNotFoundError as e:
            if e.name is not None and moduleName.startswith(e.name):
                continue  # a shorter prefix may be the module
            raise ValueError(f"importing {moduleName} failed: {_oneLine(str(e))}") from None
        except Exception as e:
            raise ValueError(
                f"importing {moduleName} failed: {type(e).__name__}: {_oneLine(str(e))}"
            ) from None
        for attribute in parts[cut:]:
            try:
                obj = getattr(obj, attribute)
            except AttributeError:
                raise ValueError(f"{moduleName} has no attribute {'.'.join(parts[cut:])!r}") from None
        return obj
    raise ValueError(f"no module named {parts[0]!r}")


class _Checker:
    def __init__(self, source: str, where: str) -> None:
        self.source = source
        self.where = where

    def fail(self, problem: str) -> ConfigError:
        return ConfigError(_oneLine(f"{self.source}: {self.where}: {problem}"))

    def string(self, table: Mapping[str, Any], key: str, choices: Any = None) -> Optional[str]:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(f"{key} must be a string, not {type(value).__name__}")
        if choices is not None and value not in choices:
            raise self.fail(f"{key} {value!r} is not one of {', '.join(choices)}")
        return value

    def positive(self, table: Mapping[str, Any], key: str) -> Optional[int]:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{key} must be an integer, not {type(value).__name__}")
        if value <= 0:
            raise self.fail(f"{key} must be positive, not {value}")
        return value

    def _id(self, key: str, value: Any, byName: Callable[[str], int], what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(f"{key} entries must be numbers or {what} names, not {type(value).__name__}")
        if isinstance(value, int):
            if value < 0:
                raise self.fail(f"{key}: {value} is not a valid {what} id")
            return value
        try:
            return byName(value)
        except KeyError:
            raise self.fail(f"{key}: unknown {what} {value!r}") from None

    def ident(self, table: Mapping[str, Any], key: str, byName: Callable[[str], int], what: str) -> Optional[int]:
        if key not in table:
            return None
        return self._id(key, table[key], byName, what)

    def idList(self, table: Mapping[str, Any], key: str, byName: Callable[[str], int], what: str) -> Optional[FrozenSet[int]]:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, list):
            raise self.fail(f"{key} must be a list, not {type(value).__name__}")
        return frozenset(self._id(key, item, byName, what) for item in value)

    def mode(self, table: Mapping[str, Any], key: str) -> Optional[int]:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, str):
            digits = value[2:] if value.lower().startswith("0o") else value
            if not digits or any(c not in "01234567" for c in digits):
                raise self.fail(f"{key} {value!r} is not an octal mode such as \"0660\"")
            value = int(digits, 8)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{key} must be an octal string or integer, not {type(value).__name__}")
        if not 0 <= value <= 0o7777:
            raise self.fail(f"{key} {oct(value)} is not a file mode")
        return value


def _user(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _group(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _service(source: str, key: str, table: Any) -> ServiceConfig:
    check = _Checker(source, f"services.{key}")
    if not isinstance(table, dict):
        raise check.fail(f"must be a table, not {type(table).__name__}")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise check.fail(f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_KEYS))}")
    handler = check.string(table, "handler")
    if handler is None:
        raise check.fail("handler is missing (a dotted name such as txqb.echo.EchoHandlers)")
    try:
        factory = resolveName(handler)
    except ValueError as e:
        raise check.fail(f"handler: {e}") from None
    if not callable(factory):
        raise check.fail(f"handler {handler!r} is not callable")
    args = table.get("handler-args", {})
    if not isinstance(args, dict):
        raise check.fail(f"handler-args must be a table, not {type(args).__name__}")
    name = check.string(table, "name") or key
    try:
        validateServiceName(name)
    except ValueError as e:
        raise check.fail(str(e)) from None
    return ServiceConfig(
        key=key,
        name=name,
        handler=handler,
        factory=factory,
        handlerArgs=dict(args),
        transport=check.string(table, "transport", TRANSPORTS),
        maxMessageSize=check.positive(table, "max-message-size"),
        allowedUids=check.idList(table, "allowed-uids", _user, "user"),
        allowedGids=check.idList(table, "allowed-gids", _group, "group"),
        rateLimit=check.string(table, "rate-limit", RATE_NAMES),
        fileOwner=check.ident(table, "file-owner", _user, "user"),
        fileGroup=check.ident(table, "file-group", _group, "group"),
        fileMode=check.mode(table, "file-mode"),
    )


def parseConfig(text: str, source: str = "<config>") -> Dict[str, ServiceConfig]:
    """
    Parse and validate a configuration's text.

    @param source: the file name, for error messages.
    @return: the services by table name, in file order.
    @raise ConfigError: anything wrong, in one line.
    """
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        raise ConfigError(f"{source}: reading TOML needs Python 3.11 or later") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_oneLine(f"{source}: not valid TOML: {e}")) from None
    unknown = sorted(set(document) - {"services"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}; expected [services.NAME] tables")
    services = document.get("services", {})
    if not isinstance(services, dict) or not services:
        raise ConfigError(f"{source}: declares no service; add a [services.NAME] table")
    result: Dict[str, ServiceConfig] = {}
    names: Dict[str, str] = {}
    for key, table in services.items():
        service = _service(source, key, table)
        if service.name in names:
            raise ConfigError(
                f"{source}: services.{key} and services.{names[service.name]}"
                f" both use the service name {service.name!r}"
            )
        names[service.name] = key
        result[key] = service
    return result


def loadConfig(path: str) -> Dict[str, ServiceConfig]:
    """Read and validate the file at C{path} (see L{parseConfig})."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    return parseConfig(text, path)

