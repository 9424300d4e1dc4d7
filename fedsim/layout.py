"""Where fedsim's own files are: in a checkout of the repository, and once installed.

The repository keeps the built-in strategies and topologies in top-level folders
(``strategies/``, ``topologies/``) and the example configs and paper reproductions in
``experiments/``. An installed fedsim holds them inside its package — ``fedsim/strategies``,
``fedsim/topologies``, ``fedsim/experiments`` (setup.py maps the folders there) —
so nothing generic lands at the top of site-packages. Code imports them as
``fedsim.strategies`` and ``fedsim.topologies`` either way: in a checkout,
`install_checkout_finder` (run by ``import fedsim``) makes exactly those two names resolve to
the top-level folders beside the ``fedsim/`` package folder.
"""
from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # the fedsim package folder
MAPPED = ("strategies", "topologies", "experiments")  # top-level in a checkout, inside fedsim when installed


def own_folder(name: str) -> Path:
    """Returns the folder of one of `MAPPED`: inside the package when installed, else the
    checkout's top-level folder beside the package."""
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parent / name


EXPERIMENTS = own_folder("experiments")  # quickstart.yaml, papers/<name>/{*.yaml, reproduce.py, results/}


class CheckoutFinder:
    """Import hook (a `sys.meta_path` finder) for a checkout: ``fedsim.strategies`` and
    ``fedsim.topologies`` are the checkout's top-level ``strategies/`` and ``topologies/``;
    their modules are then found through the package's ``__path__`` as usual."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders  # full module name -> package folder

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install_checkout_finder() -> None:
    """In a checkout (the package folder has no ``strategies/`` of its own but the folder above
    it does), puts a `CheckoutFinder` first on `sys.meta_path`, ahead of any other installed
    fedsim's finder; an installed fedsim needs none. Idempotent."""
    folders = {f"fedsim.{name}": PACKAGE.parent / name for name in ("strategies", "topologies")
               if not (PACKAGE / name).is_dir() and (PACKAGE.parent / name / "__init__.py").is_file()}
    if folders and not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder(folders))


def installed_package() -> Path:
    """Returns a folder named ``fedsim`` that holds the package as installed, strategies and
    topologies inside: the package folder itself when installed; in a checkout, a copy in a
    temporary folder removed when this process exits. (What Ray ships to machines that cannot
    see this one's files.)"""
    if all((PACKAGE / name).is_dir() for name in ("strategies", "topologies")):
        return PACKAGE
    import atexit
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix="fedsim-package-"))
    atexit.register(shutil.rmtree, staging, True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, staging / "fedsim", ignore=skip)
    for name in ("strategies", "topologies"):
        shutil.copytree(PACKAGE.parent / name, staging / "fedsim" / name, ignore=skip)
    return staging / "fedsim"
