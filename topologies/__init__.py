"""Communication graphs for decentralized protocols (networkx), mixing matrices and schedules.

Each builder is one function registered with ``@TOPOLOGIES.register(name)``; every module
in this folder is imported on the first lookup.
"""
