"""The process helper lives in pollinate.procs (cli/procs.py), shared with `pollinate demo`;
this name stays importable for the tests and benchmarks that put tests/integration on sys.path."""

from pollinate.procs import Proc, ProcGroup, pollinate_cmd  # noqa: F401
