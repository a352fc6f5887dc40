"""One error tree: every exception class of agent/ and drivers/ is a FieldgateError (agent/errors.py)."""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil

import pytest

import agent
import drivers
from agent.errors import FieldgateError

GENERATED = {"agent.upstream.formats.sparkplug_b_pb2"}  # protoc's output defines no exceptions of ours


def _modules() -> list[str]:
    names = []
    for pkg in (agent, drivers):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name not in GENERATED:
                names.append(info.name)
    return sorted(names)


def _exception_classes() -> list[tuple[str, type[BaseException]]]:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException):
                found.append((f"{name}.{cls.__qualname__}", cls))
    return found


EXCEPTIONS = _exception_classes()


def test_the_walk_finds_the_exceptions_of_every_package() -> None:
    where = {name.rsplit(".", 1)[0] for name, _ in EXCEPTIONS}
    assert {"agent.errors", "agent.upstream.tls", "agent.control.commands", "drivers.modbus.tcpclient"} <= where
    assert len(EXCEPTIONS) >= 20


@pytest.mark.parametrize("name, cls", EXCEPTIONS, ids=[n for n, _ in EXCEPTIONS])
def test_every_exception_is_a_fieldgate_error(name: str, cls: type[BaseException]) -> None:
    assert issubclass(cls, FieldgateError), f"{name} is outside the tree of agent/errors.py"


@pytest.mark.parametrize("name, cls", EXCEPTIONS, ids=[n for n, _ in EXCEPTIONS])
def test_no_exception_shadows_a_builtin(name: str, cls: type[BaseException]) -> None:
    assert not hasattr(builtins, cls.__name__), f"{name} shadows the builtin {cls.__name__}"


def test_the_tree_in_the_docstring_names_every_class_of_errors_py() -> None:
    doc = importlib.import_module("agent.errors").__doc__ or ""
    for name, cls in EXCEPTIONS:
        assert cls.__name__ in doc, f"{name} is missing from the tree of agent/errors.py"
