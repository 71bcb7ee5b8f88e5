"""Fine-tune a converted (or any) causal LM on a plain-text corpus with 🤗 Trainer: full fine-tuning or LoRA.

With LoRA (PEFT), the hyper-connection modules `attn_hc` / `mlp_hc` of an MHC model are trained in full through
`modules_to_save` (they are tiny, and they are what lets the converted model use its extra streams); after training
the adapter is saved, reloaded into a fresh base model and checked, then merged with `merge_and_unload()` into a
plain `MHCForCausalLM` that is saved with its remote code.

Single process (CPU or one GPU):

    transformers-mhc convert ../shared/models/stories260k runs/stories260k-mhc --res-logit-gap 1.0 --symmetry-breaking 0.1
    python examples/finetune.py --model runs/stories260k-mhc --output runs/ft-lora --mode lora

Two processes of data parallelism on CPU (gloo DDP; `accelerate launch --cpu --num_processes 2` runs ONE process):

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 examples/finetune.py \\
        --model runs/stories260k-mhc --output runs/ft-ddp --mode lora

On GPUs: `accelerate launch --num_processes N examples/finetune.py ...`. See docs/finetuning.md (also for FSDP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

import transformers_mhc  # noqa: F401  (registers model_type "mhc" with the Auto classes)
from transformers_mhc.models.hyper_connection import HyperConnection

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (
    Path(os.environ.get("TRANSFORMERS_MHC_SHARED", REPO_ROOT.parent / "shared"))
    / "data"
    / "shakespeare"
    / "complete_works.txt"
)
HC_MODULES = ["attn_hc", "mlp_hc"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive blocks of `seq_len` token ids; labels are the inputs (the model shifts them)."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        num_blocks = len(ids) // seq_len
        if num_blocks == 0:
            raise ValueError(f"The corpus has {len(ids)} tokens, fewer than one block of seq_len={seq_len}.")
        self.blocks = ids[: num_blocks * seq_len].view(num_blocks, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


def load_corpus(path: Path, max_chars: int | None) -> str:
    """The first `max_chars` characters of a UTF-8 text file (the whole file when `max_chars` is None)."""
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} does not exist (point it at a UTF-8 text file).")
    with path.open(encoding="utf-8", errors="replace") as handle:
        return handle.read(max_chars) if max_chars else handle.read()


def build_datasets(
    tokenizer, text: str, seq_len: int, eval_fraction: float = 0.1
) -> tuple[BlockDataset, BlockDataset]:
    """Tokenizes `text` once and splits its blocks into train / eval (the last `eval_fraction` of the text)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    split = int(len(ids) * (1 - eval_fraction))
    return BlockDataset(ids[:split], seq_len), BlockDataset(ids[split:], seq_len)


def has_hyper_connections(model: torch.nn.Module) -> bool:
    return any(isinstance(module, HyperConnection) for module in model.modules())


def hc_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The hyper-connection parameters that are *used* in the forward pass (PEFT's trained copies under LoRA)."""
    state = {}
    for name, param in model.named_parameters():
        if any(f".{module}." in name for module in HC_MODULES) and ".original_module." not in name:
            name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            state[name] = param.detach().clone()
    return state


def wrap_with_lora(model, rank: int, alpha: float):
    """LoRA on every attention/MLP projection; the hyper-connection modules are trained in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        # `modules_to_save` matches module names: the HC parameters live in named modules for this reason.
        modules_to_save=HC_MODULES if has_hyper_connections(model) else None,
    )
    return get_peft_model(model, config)


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=input_ids).logits.float()


def default_threads() -> int:
    """The cores this process may use, shared evenly by the processes torchrun starts on this machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (converted MHC, or any causal LM)")
    parser.add_argument("--output", required=True, help="folder for the adapter / model and the summary")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"UTF-8 text (default: {DEFAULT_DATA})"
    )
    parser.add_argument(
        "--max-chars", type=int, default=200_000, help="read only this much of --data (CPU-sized)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per device / process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3 for LoRA, 5e-4 for full")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute layer activations in backward"
    )
    parser.add_argument(
        "--dump-trainable",
        action="store_true",
        help="every process writes its trainable parameters to OUTPUT/rank{N}_trainable.safetensors (DDP check)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: the usable cores divided by the processes on this machine)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an --output folder that already has files in it"
    )
    args = parser.parse_args(argv)
    # Checked before anything is loaded or written (by every process alike: none writes before training ends).
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        parser.error(f"--output {output} is a file; give a folder.")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        parser.error(
            f"--output {output} already has files in it; pass --overwrite to write into it, or choose another --output."
        )
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the fine-tuning; returns (and, on the main process, writes) `OUTPUT/finetune_summary.json`."""
    args = parse_args(argv)
    output = Path(args.output)
    lr = args.lr if args.lr is not None else (2e-3 if args.mode == "lora" else 5e-4)
    set_seed(args.seed)
    # OpenMP's default (every core, per process) oversubscribes a busy machine or several torchrun processes;
    # measured: 20 LoRA steps 2.4x slower on a loaded 2-core machine.
    torch.set_num_threads(args.threads or default_threads())

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train_set, eval_set = build_datasets(tokenizer, load_corpus(args.data, args.max_chars), args.seq_len)
    hc_before = hc_state(model)
    if args.mode == "lora":
        model = wrap_with_lora(model, args.lora_r, args.lora_alpha)

    training_args = TrainingArguments(
        output_dir=str(output),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        activation_checkpointing=args.gradient_checkpointing,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        # Evaluate inside `train()`, at step 0 and at the end. Calling `trainer.evaluate()` *before* `train()`
        # marks the model as prepared by accelerate, and multi-process training then silently runs without DDP
        # (each rank trains its own copy; measured with transformers 5.23 / accelerate 1.15).
        eval_strategy="steps",
        eval_steps=args.max_steps,
        eval_on_start=True,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        ddp_find_unused_parameters=False,
        disable_tqdm=args.quiet,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set)
    trainer.train()
    if training_args.world_size > 1 and not isinstance(trainer.model_wrapped, DistributedDataParallel):
        raise RuntimeError(
            "Distributed run without DistributedDataParallel: the ranks would train separately."
        )
    eval_before, eval_after = [
        entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry
    ]
    model = trainer.model  # unwrapped from DDP

    if args.dump_trainable:
        # Every rank writes what it holds: after DDP training these must be identical across ranks.
        output.mkdir(parents=True, exist_ok=True)
        trainable = {
            n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(trainable, output / f"rank{training_args.process_index}_trainable.safetensors")

    summary = {
        "model": str(args.model),
        "mode": args.mode,
        "world_size": training_args.world_size,
        "steps": args.max_steps,
        "tokens_per_step": args.batch_size * args.seq_len * args.grad_accum * training_args.world_size,
        "lr": lr,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "train_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    hc_after = hc_state(model)
    if hc_before:
        summary["hc_max_abs_change"] = max(float((hc_after[n] - hc_before[n]).abs().max()) for n in hc_before)

    if trainer.is_world_process_zero():
        probe = eval_set[0]["input_ids"].unsqueeze(0)
        if args.mode == "lora":
            summary.update(save_lora(model, args.model, output, probe))
            tokenizer.save_pretrained(output / "merged")
        else:
            trainer.save_model(str(output / "model"))
            tokenizer.save_pretrained(output / "model")
        (output / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(
            f"{args.mode}: eval loss {eval_before:.4f} -> {eval_after:.4f} in {args.max_steps} steps "
            f"(world size {training_args.world_size}); wrote {output}"
        )
    trainer.accelerator.wait_for_everyone()
    return summary


def save_lora(peft_model, base_path: str, output: Path, probe: torch.Tensor) -> dict:
    """Saves the adapter, reloads it into a fresh base model, merges, saves the merged model; checks each step."""
    from peft import PeftModel

    trained = logits_of(peft_model, probe)
    peft_model.save_pretrained(output / "adapter")

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, output / "adapter")
    adapter_diff = float((logits_of(reloaded, probe) - trained).abs().max())

    merged = peft_model.merge_and_unload()  # a plain MHCForCausalLM with the trained HC modules in place
    merged_diff = float((logits_of(merged, probe) - trained).abs().max())
    merged.save_pretrained(output / "merged")
    merged_reloaded = AutoModelForCausalLM.from_pretrained(output / "merged", dtype=torch.float32)
    reload_diff = float((logits_of(merged_reloaded, probe) - trained).abs().max())
    return {
        "adapter_reload_max_abs_logit_diff": adapter_diff,
        "merged_max_abs_logit_diff": merged_diff,
        "merged_reload_max_abs_logit_diff": reload_diff,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
