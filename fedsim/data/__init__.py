"""Offline data sources, folder loaders, partitioners and job batching."""
from .base import FederatedData, PartitionContext, SourceContext, SourceData
from .federated import build_federated_data

__all__ = ["FederatedData", "PartitionContext", "SourceContext", "SourceData", "build_federated_data"]
