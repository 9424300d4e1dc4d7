"""Which packages fedsim installs; the rest of its metadata is in pyproject.toml.

The repository keeps the built-in strategies and topologies, and the example configs and paper
reproductions, in top-level folders (strategies/, topologies/, experiments/). They install
inside fedsim — fedsim.strategies, fedsim.topologies, fedsim.experiments — so no generic name
lands in site-packages and `fedsim reproduce` finds its papers from any folder. Every folder is
found here, so a new module, paper or config needs no edit. (A checkout imports the same
fedsim.* names through the finder in fedsim/layout.py.)
"""
from setuptools import find_namespace_packages, find_packages, setup

MAPPED = ("strategies", "topologies", "experiments")
DATA = ["*.yaml", "*.md", "*.png", "*.csv"]  # experiments/: configs, READMEs, committed results (claims.md, figures, tables)

packages = find_packages(include=["fedsim", "fedsim.*"])
mapped = [f"fedsim.{name}" for top in MAPPED
          for name in find_namespace_packages(include=[top, f"{top}.*"], exclude=["experiments.flower_app*"])]
setup(
    packages=packages + mapped,
    package_dir={f"fedsim.{top}": top for top in MAPPED},
    package_data={"fedsim": ["py.typed"], **{p: DATA for p in mapped if p.startswith("fedsim.experiments")}},
)
