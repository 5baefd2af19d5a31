"""seqio task definitions. Importing this package registers them (`import tasks`), as T5X and T0 do.

The synthetic tasks need no files. The real-data modules read under the data root (`--gin.DATA_DIR=...`); P3's
tasks are registered on their first lookup, from the configs found there.
"""

from tasks import bigbench  # noqa: F401
from tasks import continual_t0  # noqa: F401
from tasks import crossfit  # noqa: F401
from tasks import demo  # noqa: F401
from tasks import flan  # noqa: F401
from tasks import p3  # noqa: F401
from tasks import synthetic  # noqa: F401
