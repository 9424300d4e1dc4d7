"""Built-in strategies, one file per algorithm family.

Each module registers its factories with ``@STRATEGIES.register(name)``; every module in
this folder is imported on the first lookup, so a new algorithm is one new file here (or
one file anywhere, listed under the config's ``plugins:``). No engine edit is needed.
"""
