"""The method, apart from the pipeline that runs it: the noise schedule (``schedule``), the UNet
adapter and the frozen perceptual network f* (``unet``), the objectives (``objectives``: MSE, the
paper's self-perceptual loss, the peers LPL and Cas-DM), Stable-Diffusion-shaped models and their
pipelines (``models``), sampling (``sampling``) and where models run (``device``). Nothing here
imports the pipeline (``selfperceptual.pipeline``: config, DAG, stages, cluster, tracking)."""
