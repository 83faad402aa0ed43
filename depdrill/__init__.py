"""depdrill: how a service survives the failure of each thing it depends on."""

__version__ = "0.1.0"
