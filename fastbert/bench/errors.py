"""The errors `fastbert` reports as a one-line message and exit status 1 instead of a traceback."""
from fastbert.backend import BackendUnavailableError
from fastbert.bench.models import ModelSetupError
from fastbert.bench.report import PlotUnavailableError
from fastbert.bench.run import BenchError
from fastbert.bench.workloads import WorkloadError

USER_ERRORS = (BenchError, WorkloadError, ModelSetupError, PlotUnavailableError, BackendUnavailableError, OSError)
