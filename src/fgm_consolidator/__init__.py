"""fgm-consolidator: crash-safe consolidation of fine-grained-monitor parquet files.

The public surface is small: the CLI (`fgm-consolidator`), and for programs the pieces below.
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import ConsolidatorError
from .plan import Policy
from .service import Settings

try:
    __version__ = version("fgm-consolidator")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0+unknown"

__all__ = ["ConsolidatorError", "Policy", "Settings", "__version__"]
