"""
The ``twistd qbipc --config`` file format (txqb._config): what it accepts,
and a one-line error naming the file for everything it does not.
"""

from __future__ import annotations

import errno
import grp
import os
import pathlib
import pwd
import sys
from typing import Iterator

import pytest

from txqb._config import RATE_NAMES, ConfigError, loadConfig, parseConfig, resolveName
from txqb.echo import EchoHandlers

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "examples" / "services"


@pytest.fixture
def examplePath() -> Iterator[None]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("counter", None)


def test_documentedExample(examplePath: None) -> None:
    """The operator guide's example loads, every key resolved."""
    services = loadConfig(str(EXAMPLE / "services.toml"))
    assert list(services) == ["echo", "counter"]
    echo, counter = services["echo"], services["counter"]
    assert (echo.name, echo.transport, echo.maxMessageSize) == ("echo", "shm", 1048576)
    assert echo.factory is EchoHandlers
    assert echo.allows(12345, 12345)
    assert counter.transport == "socket"
    assert counter.allowedUids == {0}
    assert counter.allowedGids == {grp.getgrnam("adm").gr_gid}
    assert counter.allows(0, 99999) and not counter.allows(99999, 99999)
    assert counter.allows(99999, grp.getgrnam("adm").gr_gid)
    assert (counter.fileOwner, counter.fileGroup, counter.fileMode) == (
        0,
        grp.getgrnam("adm").gr_gid,
        0o660,
    )
    assert counter.rateLimit == "normal"
    handlers = counter.factory(**counter.handlerArgs)
    assert handlers.value == 100


def test_defaults() -> None:
    """Only the handler is required; the table name is the service name."""
    (service,) = parseConfig('[services.x]\nhandler = "txqb.echo.EchoHandlers"\n').values()
    assert service.name == "x"
    assert (service.transport, service.maxMessageSize, service.rateLimit) == (None, None, None)
    assert (service.allowedUids, service.allowedGids) == (None, None)
    assert (service.fileOwner, service.fileGroup, service.fileMode) == (None, None, None)
    assert service.handlerArgs == {}


def test_namesAndNumbers() -> None:
    """Users and groups may be given by name or number; modes as octal."""
    root = pwd.getpwuid(0).pw_name
    rootGroup = grp.getgrgid(0).gr_name
    (service,) = parseConfig(
        "[services.x]\n"
        'handler = "txqb.echo.EchoHandlers"\n'
        f'allowed-uids = [0, "{root}", 4242]\n'
        f'allowed-gids = ["{rootGroup}"]\n'
        "file-owner = 4242\n"
        f'file-group = "{rootGroup}"\n'
        "file-mode = 0o640\n"
    ).values()
    assert service.allowedUids == {0, 4242}
    assert service.allowedGids == {0}
    assert (service.fileOwner, service.fileGroup, service.fileMode) == (4242, 0, 0o640)


@pytest.mark.parametrize("rate", RATE_NAMES)
def test_rateLimits(rate: str) -> None:
    (service,) = parseConfig(
        f'[services.x]\nhandler = "txqb.echo.EchoHandlers"\nrate-limit = "{rate}"\n'
    ).values()
    assert service.rateLimit == rate


_H = 'handler = "txqb.echo.EchoHandlers"\n'


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[services.x\n", "not valid TOML"),
        ("", "declares no service"),
        ("name = 1\n", "unknown top-level key 'name'"),
        ("[services.x]\n" + _H + "colour = 'blue'\n", "services.x: unknown key 'colour'"),
        ("[services.x]\nname = 'x'\n", "services.x: handler is missing"),
        ("[services.x]\nhandler = 7\n", "handler must be a string, not int"),
        ("[services.x]\nhandler = 'nodots'\n", "not a dotted Python name"),
        ("[services.x]\nhandler = 'txqb.echo.NoSuchThing'\n", "txqb.echo has no attribute 'NoSuchThing'"),
        ("[services.x]\nhandler = 'txqbnosuchmodule.Thing'\n", "no module named 'txqbnosuchmodule'"),
        ("[services.x]\nhandler = 'txqb.echo.ECHO'\n", "is not callable"),
        ("[services.x]\n" + _H + "transport = 'pigeon'\n", "transport 'pigeon' is not one of socket, shm"),
        ("[services.x]\n" + _H + "max-message-size = '1M'\n", "max-message-size must be an integer, not str"),
        ("[services.x]\n" + _H + "max-message-size = true\n", "max-message-size must be an integer, not bool"),
        ("[services.x]\n" + _H + "max-message-size = -5\n", "max-message-size must be positive"),
        ("[services.x]\n" + _H + "allowed-uids = 0\n", "allowed-uids must be a list, not int"),
        ("[services.x]\n" + _H + "allowed-uids = [1.5]\n", "allowed-uids entries must be numbers or user names"),
        ("[services.x]\n" + _H + "allowed-uids = ['txqbnosuchuser']\n", "allowed-uids: unknown user 'txqbnosuchuser'"),
        ("[services.x]\n" + _H + "allowed-gids = ['txqbnosuchgroup']\n", "allowed-gids: unknown group 'txqbnosuchgroup'"),
        ("[services.x]\n" + _H + "file-owner = 'txqbnosuchuser'\n", "file-owner: unknown user 'txqbnosuchuser'"),
        ("[services.x]\n" + _H + "file-group = -1\n", "file-group: -1 is not a valid group id"),
        ("[services.x]\n" + _H + "file-mode = '0987'\n", "file-mode '0987' is not an octal mode"),
        ("[services.x]\n" + _H + "file-mode = 0o17777\n", "file-mode 0o17777 is not a file mode"),
        ("[services.x]\n" + _H + "file-mode = [1]\n", "file-mode must be an octal string or integer, not list"),
        ("[services.x]\n" + _H + "rate-limit = 'warp'\n", "rate-limit 'warp' is not one of fast"),
        ("[services.x]\n" + _H + "handler-args = 3\n", "handler-args must be a table"),
        ("[services.x]\n" + _H + "name = 'a/b'\n", "contains NUL or '/'"),
        ("[services.x]\n" + _H + f"name = '{'n' * 107}'\n", "service name is 107 bytes"),
        ("[services.x]\n" + _H + "[services.y]\n" + _H + "name = 'x'\n", "both use the service name 'x'"),
        ("services = 3\n", "declares no service"),
        ("[services]\nx = 3\n", "services.x: must be a table, not int"),
    ],
)
def test_badConfig(text: str, problem: str) -> None:
    """Each problem is one line that names the file and says what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parseConfig(text, "/etc/txqb/x.toml")
    message = str(caught.value)
    assert message.startswith("/etc/txqb/x.toml: ")
    assert problem in message
    assert "\n" not in message


def test_missingFile(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        loadConfig(str(path))
    assert str(caught.value) == f"{path}: cannot read: {os.strerror(errno.ENOENT)}"


def test_notUtf8(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        loadConfig(str(path))


def test_handlerImportFails(tmp_path: pathlib.Path) -> None:
    """A handler module that raises on import is reported, in one line."""
    (tmp_path / "txqbbrokenmod.py").write_text("raise RuntimeError('no\\ndatabase')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ValueError) as caught:
            resolveName("txqbbrokenmod.Handlers")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("txqbbrokenmod", None)
    assert str(caught.value) == "importing txqbbrokenmod failed: RuntimeError: no database"


def test_resolveNested() -> None:
    """Attributes after the module may be nested (a class's factory method)."""
    assert resolveName("txqb.echo.EchoHandlers.messageReceived") is EchoHandlers.messageReceived
