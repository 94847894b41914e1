"""``python -m ds_chunkflow.export``: the offline export's old command, kept working (deprecated).

The module is :mod:`ds_chunkflow.hf.export` now (``python -m ds_chunkflow.hf.export``); importing
``ds_chunkflow.export`` gives its names with a ``DeprecationWarning``. To be removed in 0.3.
"""

import warnings

from ds_chunkflow.hf.export import *  # noqa: F401,F403  (the old import path)
from ds_chunkflow.hf.export import main

warnings.warn("ds_chunkflow.export moved to ds_chunkflow.hf.export (python -m ds_chunkflow.hf.export); the old "
              "path goes away in 0.3", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    main()
