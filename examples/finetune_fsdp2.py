"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) fine-tuning of an MHC model.

For models too large to replicate on every device: each `MHCDecoderLayer` (attention, MLP and its two
hyper-connection modules) is one FSDP unit, so parameters, gradients and optimizer state are sharded across
processes and gathered one layer at a time. The same script runs on CPUs (gloo) and GPUs (NCCL):

    torchrun --standalone --nproc_per_node 2 examples/finetune_fsdp2.py --model runs/stories260k-mhc \\
        --output runs/ft-fsdp2 --max-steps 20

On CPU, accelerate (and hence Trainer's `--fsdp`) silently falls back to DDP, which is why this example drives
FSDP2 directly. At the end the full state dict is gathered on rank 0 and saved with `save_pretrained`, so the
result loads like any checkpoint (remote code included).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import transformers_mhc  # noqa: F401  (registers model_type "mhc" with the Auto classes)
from transformers_mhc.models.modeling_mhc import MHCDecoderLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import DEFAULT_DATA, build_datasets, load_corpus  # noqa: E402  (the data pipeline of finetune.py)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-chars", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda" if use_cuda else "cpu")
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    for module in model.modules():
        if isinstance(module, MHCDecoderLayer):
            fully_shard(module, mesh=mesh)  # one unit per decoder layer (HC modules included)
    fully_shard(model, mesh=mesh)  # embeddings, final norm, readout and head

    train_set, _ = build_datasets(tokenizer, load_corpus(args.data, args.max_chars), args.seq_len)
    blocks = train_set.blocks
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)  # same draw on every rank; each takes its own slice
    model.train()
    for step in range(1, args.max_steps + 1):
        indices = torch.randint(0, len(blocks), (world * args.batch_size,), generator=generator)
        batch = blocks[indices[rank * args.batch_size : (rank + 1) * args.batch_size]].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 10 == 0 or step == 1):
            print(f"step {step}: loss {float(mean_loss) / world:.4f}", flush=True)

    # Gather the full (unsharded) weights on rank 0 and save a regular checkpoint.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        config = AutoConfig.from_pretrained(args.model)
        final = AutoModelForCausalLM.from_config(config)
        final.load_state_dict(state)
        final.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        print(f"saved {args.output} ({world} processes, FSDP2 on {device.type})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
