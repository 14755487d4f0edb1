"""FSDP2 on CPU (gloo, two processes): parameters really sharded as DTensors over the decoder / ViT layer units,
data-parallel training lowers the loss, and a sharded checkpoint reloads into an unsharded model with identical
weights, and the EMA callback averages sharded parameters. This is raw FSDP2, without the Trainer; the Trainer under
`accelerate launch` (accelerate alone would train CPU processes under DDP) is tested in test_accelerate_fsdp.py."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, shrunk_config
from transformers_bagel import BagelForConditionalGeneration, BagelProcessor
from transformers_bagel.training import (
    BagelDataCollator,
    BagelEMACallback,
    apply_fsdp2,
    freeze_modules,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    text_to_image_sample,
    understanding_sample,
)


pytestmark = pytest.mark.slow  # spawns two processes


WORLD = 2
STEPS = 12


def _config(converted_dir):
    return shrunk_config(converted_dir, num_layers=2)


def _model(config):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = BagelForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    freeze_modules(model)
    return model


def _batch(processor, config, rank):
    samples = []
    for i in range(2):
        sample = text_to_image_sample(f"item {rank} {i}", None, row=i)
        latent = torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(10 * rank + i))
        sample["segments"][1]["image"], sample["segments"][1]["latents"] = None, latent
        samples.append(sample)
    samples.append(understanding_sample(None, f"question {rank}", f"answer {rank}", row=2))
    collator = BagelDataCollator(processor, config, text_cond_dropout_prob=0.0)
    return collator(samples)


def _worker(rank, port, converted_dir, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        config = _config(converted_dir)
        processor = BagelProcessor.from_pretrained(converted_dir / "processor")
        model = _model(config)
        apply_fsdp2(model, init_device_mesh("cpu", (WORLD,)))
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        big = params["model.language_model.layers.0.mlp.up_proj.weight"]
        assert big.to_local().shape[0] * WORLD == big.shape[0]  # dim-0 shards, one per rank
        units = sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
        # fully_shard turns each unit's class into FSDP<class>: two decoder layers, two ViT layers, the root
        expected = ["FSDPBagelDecoderLayer"] * 2 + ["FSDPBagelForConditionalGeneration"] + ["FSDPSiglipEncoderLayer"] * 2
        assert units == expected, units

        batch = _batch(processor, config, rank)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95),
                                      eps=1e-15)  # fmt: skip
        model.train()
        ema = BagelEMACallback(decay=0.5)  # the averages stay sharded like the parameters
        ema.on_train_begin(None, None, None, model=model)
        expected_ema = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        losses = []
        for step in range(STEPS):
            torch.manual_seed(100 + step + 1000 * rank)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.on_step_end(None, None, None)
            for name, param in model.named_parameters():
                if name in expected_ema:
                    expected_ema[name] = 0.5 * expected_ema[name] + 0.5 * param.full_tensor().detach()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / WORLD)
        save_sharded_checkpoint(model, out_dir / "sharded")
        full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        gathered_ema = ema.state_dict()
        assert isinstance(ema.shadow[0], DTensor) and set(gathered_ema) == set(expected_ema)
        for name, value in expected_ema.items():
            torch.testing.assert_close(gathered_ema[name], value, rtol=1e-6, atol=1e-7)
        if rank == 0:
            torch.save({"losses": losses, "full": full}, out_dir / "result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()



@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_fsdp2_shards_trains_and_checkpoints(converted_dir, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(free_port(), converted_dir, tmp_path), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "result.pt")
    losses = result["losses"]
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses

    # the sharded checkpoint, read back in this single process into an unsharded model: the gathered weights exactly
    plain = _model(_config(converted_dir))
    before = plain.lm_head.weight.clone()
    load_sharded_checkpoint(plain, tmp_path / "sharded")
    state = dict(plain.named_parameters())
    assert set(state) == set(result["full"])
    for name, value in result["full"].items():
        assert torch.equal(state[name].detach(), value), name
    assert not torch.equal(before, plain.lm_head.weight)  # it really was trained and reloaded
