"""Keeps `__all__` honest: sorted, importable, and exporting every public middleware class."""

import importlib
import inspect
import pkgutil

import nexus_middleware


def test_all_is_sorted_and_importable() -> None:
    names = nexus_middleware.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(nexus_middleware, name) is not None


def test_every_public_middleware_is_exported() -> None:
    exported = set(nexus_middleware.__all__)
    for module_info in pkgutil.iter_modules(nexus_middleware.__path__, "nexus_middleware."):
        module = importlib.import_module(module_info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and name.endswith("Middleware") and obj.__module__ == module.__name__:
                assert name in exported, f"{module.__name__}.{name} is missing from nexus_middleware.__all__"
        assert getattr(module, "__all__", None) is not None, f"{module.__name__} has no __all__"
        assert list(module.__all__) == sorted(module.__all__), f"{module.__name__}.__all__ is not sorted"
