"""The conformance suites, the case catalogue, the error model and the report."""
