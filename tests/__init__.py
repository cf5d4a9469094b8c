"""The test suite, a package that mirrors sd35/: tests/<package>/test_<module>.py tests sd35/<package>/<module>.py.

Shared helpers are imported as package modules: :mod:`tests.helpers` (comparisons and builders used across the
suite), ``tests.<package>.<package>_helpers`` where only that sub-package uses them.
"""
