"""Top-level pytest configuration: loads the normconf plugin.

The plugin (suites/plugin.py) adds the command-line options, loads the adapters,
parametrizes the conformance suites, prints the framework header, and writes the
JSON report and the verdict table.
"""

pytest_plugins = ["suites.plugin"]
