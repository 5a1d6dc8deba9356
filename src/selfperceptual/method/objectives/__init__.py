"""The training objectives as plug-ins, one module each (base.py says what an objective is):

- ``mse``: Eq. 4, the diffusion loss every other objective is compared with;
- ``sp``: the paper's self-perceptual objective, Eq. 11 (sp2: Eq. 13-16);
- ``lpl`` and ``casdm``: the peers (docs/peers.md).

``get(name)`` is the one way in; ``register`` adds one (docs/method.md: adding an objective).
"""

from . import mse, sp, lpl, casdm  # noqa: F401, I001 - registers the built-in objectives, in this order
from .base import Objective, ObjectiveSettings, get, names, register, registered, saving

__all__ = ["Objective", "ObjectiveSettings", "get", "names", "register", "registered", "saving"]
