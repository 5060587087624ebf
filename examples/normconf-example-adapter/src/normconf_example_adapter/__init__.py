"""An example normconf adapter for a vendor backend, to copy and adapt.

backend.py is a NumPy stand-in for the vendor's library, and adapter.py the
normconf adapter that drives it. pyproject.toml registers the adapter under the
`normconf.adapters` entry point group, so an installed copy runs whenever the
normconf suite runs without --framework and --adapter.
"""
