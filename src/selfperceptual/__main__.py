import os
import sys

# transformers logs warnings at import that are noise in a stage's log.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if os.environ.get("SP_STAGE_SERVER"):  # a pipeline's stage server has the imports done (warm.py)
    from .pipeline.warm import delegate

    code = delegate(os.environ["SP_STAGE_SERVER"], sys.argv)
    if code is not None:
        sys.exit(code)

from .pipeline.cli import main

sys.exit(main())
