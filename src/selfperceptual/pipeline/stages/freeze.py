"""freeze: the frozen perceptual network f* copied from a trained model (Algorithm 1 l. 9-11).

Saves the whole frozen UNet (a diffusers UNet folder); the SP training stage loads from it only
the parts its layer l needs (for the mid-block feature: conv_in, time embedding, down blocks and
mid block). ``summary.json`` gives the parameter count of f*_l for each layer choice of Table 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..io import write_json
from ...method.models import load_unet
from ...method.unet import LAYERS, PerceptualNetwork

log = logging.getLogger("freeze")
PARAMS = ()


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="folder whose pipeline/ is copied")


def run(args, config, scale, out) -> None:
    unet = load_unet(args.model / "pipeline").requires_grad_(False).eval()
    unet.save_pretrained(out / "network", safe_serialization=True)
    summary = {
        "source": str(args.model),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "perceptual_parameters": {layer: PerceptualNetwork(unet, layer).num_parameters() for layer in LAYERS},
    }
    write_json(out / "summary.json", summary)
    log.info("freeze: %s", summary)
