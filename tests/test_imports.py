"""Every module of the ``scse_monai`` package imports in the core environment (``.venv``).

The MONAI Label and Deploy apps live outside the package (``apps/``) because their frameworks are not installed
here; nothing inside ``scse_monai/`` may depend on them.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import scse_monai


def _modules() -> list[str]:
    names = [scse_monai.__name__]
    for info in pkgutil.walk_packages(scse_monai.__path__, prefix=f"{scse_monai.__name__}."):
        names.append(info.name)
    return sorted(names)


def test_the_package_has_modules_to_import():
    names = _modules()
    assert "scse_monai.apps.organs" in names
    assert not [n for n in names if n.startswith(("scse_monai.apps.deploy", "scse_monai.apps.monailabel"))]


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name):
    importlib.import_module(name)
