"""freeze: the frozen perceptual network f*_l copied from a trained model (Algorithm 1 l. 9-11)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..io import write_json
from ..models import load_unet
from ..unet import PerceptualNetwork

log = logging.getLogger("freeze")


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="folder whose pipeline/ is copied")


def run(args, config, scale, out) -> None:
    unet = load_unet(args.model / "pipeline")
    network = PerceptualNetwork.frozen_copy(unet, config.train.sp.layer)
    network.save(out / "network")
    summary = {
        "layer": network.layer,
        "parameters": network.num_parameters(),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
    }
    write_json(out / "summary.json", summary)
    log.info("freeze: %s", summary)
