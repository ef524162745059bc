"""Tooling shared by the benchmark and the tests (never imported by the services).

Product and tool code (services/, db/, bench/) never imports tests/; what both
the benchmark and the tests need lives here.
"""
