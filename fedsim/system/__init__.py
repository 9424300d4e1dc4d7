"""Client system profiles on the virtual clock: compute, links, availability, dropout."""
from .models import AvailabilityModel, ComputeModel, DropoutModel, LinkModel, SystemContext
from .population import Population

__all__ = ["AvailabilityModel", "ComputeModel", "DropoutModel", "LinkModel", "Population", "SystemContext"]
