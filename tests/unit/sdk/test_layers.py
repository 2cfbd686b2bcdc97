"""The layers import only downwards: the client SDK carries no server-side code."""

from __future__ import annotations

import subprocess
import sys

SERVER_SIDE = ("tensafe_keys", "tensafe_trainer", "tensafe_operator", "torch", "fastapi")


def test_the_client_sdk_imports_no_key_management_and_no_trainer():
    probe = ("import importlib, pkgutil, sys, tg_tinker\n"
             "for m in pkgutil.iter_modules(tg_tinker.__path__): importlib.import_module('tg_tinker.' + m.name)\n"
             f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({SERVER_SIDE!r})))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_key_management_lives_outside_the_client_sdk():
    import importlib
    import inspect
    import pkgutil

    import tg_tinker
    from tensafe_keys.store import KeyProvider

    for module in pkgutil.iter_modules(tg_tinker.__path__):
        loaded = importlib.import_module(f"tg_tinker.{module.name}")
        providers = [name for name, value in vars(loaded).items()
                     if inspect.isclass(value) and issubclass(value, KeyProvider)]
        assert providers == [], (module.name, providers)
