import os
import sys

# transformers warns at import that torchvision is missing (it is, on purpose: see README).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .cli import main  # noqa: E402

sys.exit(main())
