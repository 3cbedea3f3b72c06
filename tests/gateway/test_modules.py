"""Every sample_gateway module has a sorted, importable `__all__`, like nexus_middleware's."""

import importlib
import pkgutil

import sample_gateway
import sample_gateway.balancing


def test_every_module_has_a_sorted_importable_all() -> None:
    for package in (sample_gateway, sample_gateway.balancing):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            names = getattr(module, "__all__", None)
            assert names is not None, f"{info.name} has no __all__"
            assert list(names) == sorted(names), f"{info.name}.__all__ is not sorted"
            for name in names:
                assert hasattr(module, name), f"{info.name}.{name} is in __all__ but missing"
