import os
import sys

# transformers warns at import that torchvision is missing (it is, on purpose: see README).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .cli import main

sys.exit(main())
