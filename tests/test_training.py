"""The shared training loop, condition dropout and the unconditional variant."""

import copy

import pytest
import torch

from selfperceptual.pipeline.data.latents import ShardWriter
from selfperceptual.pipeline.distributed import sample_generators
from selfperceptual.method.losses import MSELoss, SelfPerceptualLoss
from selfperceptual.method.schedule import Schedule
from selfperceptual.pipeline.training import LatentData, LossHistory, Prefetch, StepInputs, train, update_ema
from selfperceptual.method.unet import PerceptualNetwork


def _latent_folder(folder, count=12, shard_size=5):
    """An encode stage's folder of random latents, written as encode writes it (several shards)."""
    generator = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, shard_size)
    for start in range(0, count, 4):
        size = min(4, count - start)
        writer.add(torch.randn(size, 4, 8, 8, generator=generator), torch.full((size, 4, 8, 8), 0.1), torch.randn(size, 6, 32, generator=generator),
                   [f"{i:09d}" for i in range(start, start + size)], [f"caption {i}" for i in range(start, start + size)])
    writer.close(torch.zeros(1, 6, 32))
    return LatentData(folder)


def test_shards_hold_every_sample_once_and_read_back_exactly(tmp_path):
    data = _latent_folder(tmp_path / "data", count=13, shard_size=5)
    assert len(data) == 13 and len(data.files) == 3  # 5 + 5 + 3
    assert data.captions(7) == [f"caption {i}" for i in range(7)]
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(4, 4, 8, 8, generator=generator)
    assert torch.equal(data._rows(0)[0], means[0]) and torch.equal(data._rows(3)[0], means[3])
    assert data._rows(6)[2].dtype == torch.float16  # text embeddings are kept in half precision


def test_condition_dropout_and_uncond_feed_the_empty_caption(tmp_path):
    data = _latent_folder(tmp_path / "data")
    empty = data.empty[0]
    _, context = data.batch([torch.Generator().manual_seed(0)] * 2000, 0.1, "text")
    dropped = (context == empty).flatten(1).all(1).float().mean().item()
    assert 0.07 < dropped < 0.13
    _, context = data.batch([torch.Generator().manual_seed(0)] * 50, 0.0, "text")
    assert not (context == empty).flatten(1).all(1).any()
    _, context = data.batch([torch.Generator().manual_seed(0)] * 50, 0.0, "uncond")
    assert (context == empty).all()


def test_batches_are_reproducible_from_the_generator(tmp_path):
    data = _latent_folder(tmp_path / "data")
    a = data.batch([torch.Generator().manual_seed(5)] * 4, 0.1, "text")
    b = data.batch([torch.Generator().manual_seed(5)] * 4, 0.1, "text")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_loss_history_buckets_by_timestep():
    history = LossHistory(1000)
    history.record(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 100, 999]))
    history.flush(1)
    assert [point[:2] for point in history.series["loss"]] == [(1, 3.0)]
    assert [point[:2] for point in history.series["loss_t0000_0249"]] == [(1, 2.0)]
    assert [point[:2] for point in history.series["loss_t0750_0999"]] == [(1, 5.0)]


def test_mse_then_sp_training_runs_and_keeps_the_frozen_copy(tmp_path, tiny_unet, smoke_config):
    data = _latent_folder(tmp_path / "data")
    schedule = Schedule.zero_snr()
    settings = smoke_config.train.model_copy(update={"global_batch": 4})
    mse = settings.mse.model_copy(update={"num_steps": 3})
    start = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    result = train(tiny_unet, data, MSELoss(schedule), mse, settings, "text", 1000)
    ema, history = result.ema, result.history
    assert len(history.series["loss"]) >= 1
    changed = [k for k, v in tiny_unet.state_dict().items() if not torch.equal(v, start[k])]
    assert changed, "MSE training did not update the UNet"
    ema_moved = [k for k, v in ema.state_dict().items() if not torch.equal(v, start[k])]
    assert ema_moved and any(not torch.equal(ema.state_dict()[k], tiny_unet.state_dict()[k]) for k in ema_moved)

    frozen = PerceptualNetwork.frozen_copy(ema, "midblock")
    frozen_state = {k: v.clone() for k, v in frozen.state_dict().items()}
    sp = settings.sp.model_copy(update={"num_steps": 3})
    train(tiny_unet, data, SelfPerceptualLoss(schedule, frozen), sp, settings, "uncond", 1000)
    assert all(torch.equal(v, frozen_state[k]) for k, v in frozen.state_dict().items())


def test_both_networks_see_the_empty_caption_when_dropped_or_unconditional(tmp_path, tiny_unet, smoke_config):
    """Condition dropout and the unconditional variant feed the empty caption's embedding to the
    online model and to the frozen network alike (what the pipeline's unconditional branch feeds)."""
    data = _latent_folder(tmp_path / "data")
    frozen = PerceptualNetwork.frozen_copy(tiny_unet, "midblock")
    seen = {"online": [], "frozen": []}
    for name, module in (("online", tiny_unet.mid_block), ("frozen", frozen.mid_block)):
        module.register_forward_pre_hook(lambda m, args, kwargs, name=name: seen[name].append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    settings = smoke_config.train.model_copy(update={"global_batch": 4})
    loss = SelfPerceptualLoss(Schedule.zero_snr(), frozen)
    for conditioning, dropout in (("uncond", 0.0), ("text", 1.0)):
        sp = settings.sp.model_copy(update={"num_steps": 1, "condition_dropout": dropout})
        train(tiny_unet, data, loss, sp, settings, conditioning, 1000)
    assert len(seen["online"]) == 2 and len(seen["frozen"]) == 4  # real and predicted branch, each step
    for context in seen["online"] + seen["frozen"]:
        assert torch.equal(context, data.empty.expand_as(context))
    seen["online"].clear(), seen["frozen"].clear()
    sp = settings.sp.model_copy(update={"num_steps": 1})  # SP's own setting: no dropout
    train(tiny_unet, data, loss, sp, settings, "text", 1000)
    assert all(not (context == data.empty).flatten(1).all(1).any() for context in seen["online"] + seen["frozen"])
    assert torch.equal(seen["online"][0], seen["frozen"][0])


def test_casdm_trains_both_modules_in_the_one_loop_and_resumes_bit_for_bit(tmp_path, tiny_unet, smoke_config):
    """Cas-DM's two modules go through the shared loop as one model: both change, module two's
    output layer leaves zero, and two steps then a resume give the weights of four uninterrupted ones."""
    import copy
    from types import SimpleNamespace

    from selfperceptual.method.cascade import CascadedUNet, FeatnetLPIPS, module_two
    from selfperceptual.pipeline.checkpoints import CheckpointStore
    from selfperceptual.method.featnet import TinyFeatureNet
    from selfperceptual.method.losses import CascadeLoss
    from selfperceptual.method.models import build_vae

    data = _latent_folder(tmp_path / "data")
    schedule = Schedule.zero_snr()
    settings = smoke_config.train.model_copy(update={"global_batch": 4, "checkpoint_every_steps": 2})
    vae = build_vae(SimpleNamespace(block_out_channels=[16, 32, 32], latent_channels=4, norm_num_groups=8), resolution=32, seed=0)
    loss = CascadeLoss(schedule, vae, FeatnetLPIPS(TinyFeatureNet(num_classes=6, feature_dim=16)))
    start = CascadedUNet(tiny_unet, module_two(tiny_unet), schedule).state_dict()

    def fresh():
        model = CascadedUNet(copy.deepcopy(tiny_unet), module_two(tiny_unet), schedule)
        model.load_state_dict(start)
        return model

    casdm = settings.casdm.model_copy(update={"num_steps": 4})
    whole = train(fresh(), data, loss, casdm, settings, "text", 1000, objective="casdm").ema.state_dict()
    for name in ("unet.conv_in.weight", "x0_unet.conv_in.weight", "x0_unet.conv_out.weight"):
        assert not torch.equal(whole[name], start[name]), f"{name} did not train"
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    train(fresh(), data, loss, casdm.model_copy(update={"num_steps": 2}), settings, "text", 1000, store, objective="casdm")
    resumed = train(fresh(), data, loss, casdm, settings, "text", 1000, store, objective="casdm")
    assert resumed.first_step == 2
    assert all(torch.equal(value, whole[key]) for key, value in resumed.ema.state_dict().items())


def test_prefetched_step_inputs_are_the_ones_made_in_line(tmp_path):
    """The background thread prepares exactly what the loop would (each step's own generators), in
    step order, and an error while preparing reaches the loop."""
    data, loss = _latent_folder(tmp_path / "data", count=13), SelfPerceptualLoss(Schedule.zero_snr(), None)

    def prepare(step):
        generators = sample_generators(0, step, range(4, 8))
        x0, context = data.batch(generators, 0.1, "text")
        return StepInputs(x0, context, loss.draw(x0, generators))

    inputs = Prefetch(prepare, range(3, 9), pin=False)
    prefetched = list(zip(range(3, 9), inputs))
    inputs.close()
    for step, got in prefetched:
        want = prepare(step)
        assert torch.equal(got.x0, want.x0) and torch.equal(got.context, want.context)
        assert got.draws.keys() == want.draws.keys() == {"eps", "t", "t_prime"}
        assert all(torch.equal(got.draws[key], want.draws[key]) for key in want.draws)
    assert not torch.equal(prefetched[0][1].x0, prefetched[1][1].x0)

    def broken(step):
        if step == 5:
            raise OSError("shard unreadable")
        return prepare(step)

    inputs = Prefetch(broken, range(3, 9), pin=False)
    with pytest.raises(OSError, match="shard unreadable"):
        list(inputs)
    inputs.close()


def test_ema_update_in_one_call_matches_the_per_tensor_update(tiny_unet):
    online = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        for parameter in online.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
    ema, expected = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    update_ema(ema, online, 0.9)
    with torch.no_grad():
        for averaged, parameter in zip(expected.parameters(), online.parameters()):
            averaged.lerp_(parameter, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), expected.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), tiny_unet.parameters()))


def test_an_objectives_memory_settings_change_memory_not_training(tmp_path, tiny_unet, smoke_config):
    """An objective's own micro-batch cap replaces train.max_per_device_batch (gradient accumulation
    makes up the global batch), and gradient checkpointing recomputes the same activations: the
    weights come out the same."""

    class CountingLoss(MSELoss):
        def __call__(self, denoiser, x0, context, **draws):
            sizes.append(len(x0))
            return super().__call__(denoiser, x0, context, **draws)

    data, start = _latent_folder(tmp_path / "data", count=16), copy.deepcopy(tiny_unet.state_dict())
    settings = smoke_config.train.model_copy(update={"global_batch": 8, "max_per_device_batch": 8})
    weights = []
    for update, micro_batches in (({}, [8, 8]), ({"gradient_checkpointing": True}, [8, 8]), ({"max_per_device_batch": 3}, [2, 2, 2, 2] * 2)):
        sizes: list[int] = []
        tiny_unet.load_state_dict(start)
        train(tiny_unet, data, CountingLoss(Schedule.zero_snr()), settings.mse.model_copy(update={"num_steps": 2, **update}), settings, "text", 1000)
        assert sizes == micro_batches, update
        weights.append(copy.deepcopy(tiny_unet.state_dict()))
    plain, checkpointed, accumulated = weights
    assert all(torch.equal(plain[key], checkpointed[key]) for key in plain)
    # Accumulation sums in another order; Adam divides by the gradient's size, so in a few weights with
    # near-zero gradients that noise shows as part of a step (as test_distributed.assert_same_updates).
    moved = torch.cat([(plain[key] - start[key]).abs().flatten() for key in plain])
    differs = torch.cat([(plain[key] - accumulated[key]).abs().flatten() for key in plain])
    assert moved.mean() > 0 and differs.mean() < 1e-3 * moved.mean() and differs.max() < 0.1 * moved.max()


def test_compiled_channels_last_training_matches_eager_and_resumes_bit_for_bit(tmp_path, tiny_unet, smoke_config, monkeypatch):
    """train.compile and train.channels_last change speed, not training: SP (the UNet and f* both
    compiled, every network NHWC) gives eager's weights within float noise, and a resumed run
    (contiguous checkpoints back into the channels-last layout) those of an uninterrupted one bit
    for bit. Compiled with aot_eager: Dynamo's graph capture and AOTAutograd's graphs as on a GPU,
    without Inductor's code generation (minutes on a CPU; docs/speed.md)."""
    from selfperceptual.method import unet as unet_module
    from selfperceptual.pipeline.checkpoints import CheckpointStore

    monkeypatch.setattr(unet_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    data, start = _latent_folder(tmp_path / "data", count=8), copy.deepcopy(tiny_unet.state_dict())
    plain = smoke_config.train.model_copy(update={"global_batch": 4, "max_per_device_batch": 4, "checkpoint_every_steps": 1})
    fast = plain.model_copy(update={"compile": True, "channels_last": True})
    sp = plain.sp.model_copy(update={"num_steps": 2})

    def run(settings, steps=2, store=None):
        model = copy.deepcopy(tiny_unet)
        model.load_state_dict(start)
        loss = SelfPerceptualLoss(Schedule.zero_snr(), PerceptualNetwork.frozen_copy(model, "midblock"))
        result = train(model, data, loss, sp.model_copy(update={"num_steps": steps}), settings, "text", 1000, store)
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == settings.channels_last
        return result, model.state_dict()

    (eager, eager_weights), (compiled, compiled_weights) = run(plain), run(fast)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the UNet's forward and f*'s were compiled
    assert compiled.ema.conv_in.weight.is_contiguous()  # what the stage saves leaves the loop in the usual layout
    assert abs(compiled.history.final() - eager.history.final()) <= 1e-5 * abs(eager.history.final())
    moved = torch.cat([(eager_weights[key] - start[key]).abs().flatten() for key in start])
    differs = torch.cat([(eager_weights[key] - compiled_weights[key]).abs().flatten() for key in start])
    assert moved.mean() > 0 and differs.mean() < 1e-3 * moved.mean() and differs.max() < 0.1 * moved.max()

    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    run(fast, steps=1, store=store)
    resumed, resumed_weights = run(fast, store=store)
    assert resumed.first_step == 1
    assert all(torch.equal(resumed_weights[key], compiled_weights[key]) for key in start)
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.state_dict().values(), compiled.ema.state_dict().values()))
