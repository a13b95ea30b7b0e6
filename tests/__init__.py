"""The tests, a package so that their own helpers import as `tests.support` (from the tests
and from `bench/`), not from a folder put on `sys.path`."""
