"""The node runs the spec's whole training recipe: schedule, AdamW settings, global-norm clipping across
stages (NORM frames over the activation channels), and equals the single process doing the same."""

from __future__ import annotations

import dataclasses
import math

import pytest

from node.config import NodeConfig, RecipeConfig
from node.errors import UnexpectedFrameError
from node.model import optim_config, training_section
from node.testing.swarm import run_local_swarm
from node.wire import frames
from protocol.modelspec import TrainingSection
from sharding import PRESETS, OptimConfig, load_corpus, train_reference
from sharding.train import lr_at

M, B = 2, 2


def test_norm_payload_round_trip_and_bad_payloads() -> None:
    assert frames.decode_norm(frames.encode_norm(12.5)) == 12.5
    for bad in (b"\x00" * 7, frames.encode_norm(math.nan), frames.encode_norm(-1.0), frames.encode_norm(math.inf)):
        with pytest.raises(UnexpectedFrameError, match="norm frame"):
            frames.decode_norm(bad)


def test_recipe_section_has_every_training_field() -> None:
    runtime_fields = {"stages", "codec", "microbatches", "microbatch_size", "lr",  # from cfg.runtime:
                      "replica_averaging", "powersgd_rank", "powersgd_bits", "powersgd_iterations", "powersgd_block_rank",
                      "pipeline_schedule", "max_staleness", "async_lookahead", "replica_exchange"}
    assert {f.name for f in dataclasses.fields(RecipeConfig)} | runtime_fields == {
        f.name for f in dataclasses.fields(TrainingSection)}


def test_default_node_runs_the_optimiser_of_before() -> None:
    runs, before = optim_config(NodeConfig(), PRESETS["tiny"]), OptimConfig()
    assert [lr_at(s, runs) for s in range(40)] == [lr_at(s, before) for s in range(40)]
    assert dataclasses.replace(runs, schedule=None) == before


def test_node_config_recipe_becomes_the_optimiser() -> None:
    cfg = NodeConfig()
    cfg.recipe = RecipeConfig(warmup_steps=3, data_seed=5, schedule="wsd", total_steps=20, cooldown_steps=4,
                              min_lr_ratio=0.0, beta1=0.8, beta2=0.99, weight_decay=0.0, adam_eps=1e-6,
                              grad_clip=1.0, optimizer="muon", muon_momentum=0.9)
    cfg.optim_lr = 1e-3
    o = optim_config(cfg, PRESETS["tiny"])
    assert (o.optimizer, o.muon_momentum) == ("muon", 0.9)
    assert (o.lr, o.warmup_steps, o.data_seed, o.schedule, o.decay_steps, o.cooldown_steps) == (
        1e-3, 3, 5, "wsd", 20, 4)
    assert (o.betas, o.weight_decay, o.eps, o.grad_clip, o.min_lr_ratio) == ((0.8, 0.99), 0.0, 1e-6, 1.0, 0.0)
    assert training_section(cfg).total_steps == 20


@pytest.mark.parametrize(("change", "field"), [({"schedule": "linear"}, "schedule"),
                                                ({"schedule": "cosine"}, "total_steps"),
                                                ({"batch_tokens": 100}, "batch_tokens"),
                                                ({"beta1": 1.5}, "beta1"),
                                                ({"optimizer": "lion"}, "training.optimizer"),
                                                ({"muon_momentum": -0.1}, "training.muon_momentum")])
def test_bad_recipe_names_the_field(change: dict, field: str) -> None:
    cfg = NodeConfig()
    cfg.recipe = dataclasses.replace(cfg.recipe, **change)
    with pytest.raises(ValueError, match=field):
        optim_config(cfg, PRESETS["tiny"])


def test_clipping_is_refused_with_replicated_stages() -> None:
    cfg = NodeConfig()
    cfg.recipe.grad_clip = 1.0
    cfg.replicas.enabled = True
    with pytest.raises(ValueError, match="recipe.grad_clip"):
        cfg.validate()


@pytest.mark.network
@pytest.mark.timeout(60)
def test_norms_travel_down_and_back_and_a_late_one_names_the_timeout() -> None:
    import trio

    from node.errors import PeerLostError
    from node.net.host import full_addrs
    from node.wire.channel import ActEndpoint, LocalInfo
    from tests.node.conftest import FSPEC, SPEC_HASH, np_decoder, running_host, tcfg

    async def main() -> None:
        async with running_host(11) as (h1, i1), running_host(12) as (h2, i2), trio.open_nursery() as nursery:
            down_ep = ActEndpoint(h1, local=LocalInfo.of(i1, SPEC_HASH, 1, 3), frame_spec=FSPEC, cfg=tcfg(),
                                  decoder=np_decoder)
            up_ep = ActEndpoint(h2, local=LocalInfo.of(i2, SPEC_HASH, 0, 3), frame_spec=FSPEC, cfg=tcfg(),
                                decoder=np_decoder)
            up = await up_ep.open(full_addrs(h1)[0])  # stage 0's link to stage 1
            nursery.start_soon(up.run_reader)
            down = await down_ep.incoming.receive()  # stage 1's link to stage 0
            await up.send_norm(4, frames.NORM_PARTIAL, 2.5)
            assert await down.recv_norm(4, frames.NORM_PARTIAL, 5) == 2.5
            await down.send_norm(4, frames.NORM_TOTAL, 7.25)
            assert await up.recv_norm(4, frames.NORM_TOTAL, 5) == 7.25
            with pytest.raises(PeerLostError, match="grad_norm_timeout_s=0.2"):
                await up.recv_norm(5, frames.NORM_TOTAL, 0.2)
            # the async schedule's way: partial sums upstream, the total downstream, taken without waiting
            assert up.take_norm(6, frames.NORM_UP) is None
            await down.send_norm(6, frames.NORM_UP, 1.5)
            with trio.fail_after(5):  # the frame is on its way: poll the condition, as the async loop does on wake-ups
                while (got := up.take_norm(6, frames.NORM_UP)) is None:
                    await trio.sleep(0.01)
            assert got == 1.5 and up.take_norm(6, frames.NORM_UP) is None
            await up.send_norm(6, frames.NORM_DOWN, 4.0)
            assert await down.recv_norm(6, frames.NORM_DOWN, 5) == 4.0
            nursery.cancel_scope.cancel()

    trio.run(main)


CLIP_ARGS = ["--recipe-grad-clip", "0.05", "--recipe-schedule", "cosine", "--recipe-total-steps", "4",
             "--recipe-warmup-steps", "2", "--lr", "0.01", "--threads", "1"]


@pytest.mark.network
@pytest.mark.timeout(300)
def test_three_stages_with_clip_and_cosine_match_reference(tmp_path) -> None:
    optim = OptimConfig(lr=0.01, warmup_steps=2, schedule="cosine", decay_steps=4, grad_clip=0.05)
    ref = train_reference(PRESETS["tiny-llama"], optim, 4, M, B, load_corpus("synthetic"))
    res = run_local_swarm(3, 4, tmp_path, model="tiny-llama", microbatches=M, microbatch_size=B, corpus="synthetic",
                          threads=[1, 1, 1], timeout_s=250, extra_args=CLIP_ARGS)
    assert res.losses == pytest.approx(ref, abs=1e-4)
    unclipped = train_reference(PRESETS["tiny-llama"], dataclasses.replace(optim, grad_clip=0.0), 4, M, B,
                                load_corpus("synthetic"))
    assert abs(unclipped[-1] - ref[-1]) > 1e-3  # the clip is active: a stage clipping alone would not match
