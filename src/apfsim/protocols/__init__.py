"""Protocol variants: each a host half over the generic core (and, where its guest differs,
a guest driver), with the shared pieces in :mod:`apfsim.protocols.common`. The registry that
names them is :mod:`apfsim.registry`."""
