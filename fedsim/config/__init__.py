"""Configuration: YAML + overrides -> validated, typed `Config` (see load_config)."""
from .checks import Each, Finite, Ge, Gt, OneOf, Range
from .components import Component, ComponentSpec, Knob, signature_knobs
from .load import Config, load_config

__all__ = [
    "Component",
    "ComponentSpec",
    "Config",
    "Each",
    "Finite",
    "Ge",
    "Gt",
    "Knob",
    "OneOf",
    "Range",
    "load_config",
    "signature_knobs",
]
