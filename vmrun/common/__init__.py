"""Code both sides use: the host's vmrun and the guest's agent (the guest image carries
this package beside vmrun/agent/). Neither side's internals: only the standard library."""
