"""`transformers-mhc quickstart`: the whole retrofit story in one command, offline, in seconds on a CPU.

1. take a Llama checkpoint (`--model`), or build a small random one with a byte-level BPE tokenizer trained on the
   built-in text (nothing is downloaded);
2. convert it to hyper-connections and check that the logits and the greedy continuation are unchanged;
3. fine-tune briefly on the built-in public-domain text, with a progress bar;
4. generate;
5. save with a model card and the model code;
6. reload with `trust_remote_code=True` in a fresh process where `transformers_mhc` cannot be imported, and compare
   the logits;
7. print a short report (also written to `OUTPUT/quickstart_report.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from transformers_mhc.conversion import (
    ConversionError,
    convert_llama_to_mhc,
    fixed_batch,
    load_source_config,
    resolve_source,
)
from transformers_mhc.conversion.convert import check_weight_files, quiet_transformers

from .data import load_text
from .hub import build_model_card, save_for_hub
from .models.configuration_mhc import MAX_STREAMS
from .models.modeling_mhc import MHCForCausalLM
from .outputs import LOCK_SUFFIX, WORK_SUFFIX, OutputError, OutputFolder

REPORT_FILE = "quickstart_report.json"
# Everything the quickstart writes into --output: a folder holding only these (and a report) is its own.
OWN_ENTRIES = frozenset(
    {"llama", "converted", "finetuned", REPORT_FILE, f".converted{LOCK_SUFFIX}", f".converted{WORK_SUFFIX}"}
)
MAX_STEPS = 100_000
PROMPT = "Alice was beginning"
# Checks of the report; the quickstart fails (exit code 1) when one does not hold.
CONVERSION_TOLERANCE = 1e-4  # max |logit difference| of the fp32 conversion
RELOAD_TOLERANCE = 1e-5  # max |logit difference| between the saved model and its reload in a fresh process
# Below this size of weights, one intra-op thread is as fast as several (the matmuls are tiny) and does not slow
# down by an order of magnitude when other jobs share the CPU.
SMALL_CHECKPOINT_BYTES = 80_000_000


@dataclass
class QuickstartReport:
    """Everything the quickstart measured (see `run_quickstart`)."""

    source: str
    output: str
    num_streams: int
    conversion_max_abs_logit_diff: float
    conversion_greedy_identical: bool
    conversion_greedy_tokens: int
    steps: int
    losses: list[float]
    loss_before: float
    loss_after: float
    prompt: str
    generated: str
    finetuned_path: str
    reload_max_abs_logit_diff: float
    reload_class: str
    reload_package_importable: bool
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def checks(self) -> dict[str, bool]:
        """Named pass/fail checks."""
        return {
            "conversion reproduces the source logits": self.conversion_max_abs_logit_diff
            <= CONVERSION_TOLERANCE,
            "conversion reproduces the greedy continuation": self.conversion_greedy_identical,
            "fine-tuning lowers the loss": self.loss_after < self.loss_before,
            "reload without the package reproduces the logits": (
                self.reload_max_abs_logit_diff <= RELOAD_TOLERANCE
                and not self.reload_package_importable
                and self.reload_class.startswith("transformers_modules.")
            ),
        }

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "checks": self.checks, "ok": self.ok}


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def build_tokenizer(text: str, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `text` in memory: any string encodes, nothing is downloaded.

    Ids 0, 1, 2 are `<unk>`, `<s>` (prepended to every encoding) and `</s>`, as in Llama's defaults.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_tiny_llama(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Saves a small random Llama (2 layers, hidden 64, GQA 4/2 heads) and its tokenizer into `folder`."""
    folder = Path(folder)
    tokenizer = build_tokenizer(load_text())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.05,  # decisive logits, so greedy decoding of the random model has no near-ties
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with quiet_transformers():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def text_token_ids(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one sequence of ids (no special tokens)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


@torch.no_grad()
def evaluate_loss(model, ids: torch.Tensor, seq_len: int) -> float:
    """Mean next-token loss over consecutive windows of `ids` (deterministic)."""
    model.eval()
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - 1, seq_len) if len(ids[i : i + seq_len]) > 1]
    total = count = 0.0
    for window in windows:
        batch = window.unsqueeze(0)
        loss = model(batch, labels=batch).loss
        total += float(loss) * (len(window) - 1)
        count += len(window) - 1
    return total / count


def fine_tune(
    model,
    ids: torch.Tensor,
    steps: int,
    lr: float,
    seq_len: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Full fine-tuning with AdamW on random windows of `ids`; returns the loss of every step."""
    seq_len = min(seq_len, len(ids) - 1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="fine-tuning", unit="step", disable=not progress, leave=False)
    for _ in bar:
        starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# Runs in a fresh interpreter: `transformers_mhc` is made unimportable before anything else is imported, so the
# model can only come from the code files saved next to the weights.
_RELOAD_SCRIPT = r"""
import importlib.abc, json, sys

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers_mhc" or name.startswith("transformers_mhc."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the quickstart)")
        return None

sys.meta_path.insert(0, HidePackage())
try:
    import transformers_mhc  # noqa: F401
    importable = True
except ImportError:
    importable = False

import torch
from transformers import AutoModelForCausalLM

folder, inputs, outputs = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.load(inputs)).logits
torch.save(logits, outputs)
cls = type(model)
print(json.dumps({"class": f"{cls.__module__}.{cls.__name__}", "package_importable": importable}))
"""


def reload_in_fresh_process(folder: str | os.PathLike, input_ids: torch.Tensor, threads: int = 1) -> tuple:
    """Loads `folder` with `trust_remote_code=True` in a new Python process that cannot import `transformers_mhc`.

    Returns `(logits, info)` where `info` has the loaded class (`"transformers_modules...."`) and whether the
    package was importable there (it must not be).
    """
    with tempfile.TemporaryDirectory(prefix="mhc-quickstart-") as scratch:
        scratch = Path(scratch)
        torch.save(input_ids, scratch / "inputs.pt")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(
                scratch / "modules"
            ),  # the copied remote code goes away with the scratch dir
            "TRANSFORMERS_VERBOSITY": "error",
            "OMP_NUM_THREADS": str(threads),
        }
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                _RELOAD_SCRIPT,
                str(folder),
                str(scratch / "inputs.pt"),
                str(scratch / "out.pt"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"Reloading {folder} in a fresh process failed:\n{result.stderr[-3000:]}")
        info = json.loads(result.stdout.strip().splitlines()[-1])
        return torch.load(scratch / "out.pt"), info


# --------------------------------------------------------------------------------------------------
# The quickstart
# --------------------------------------------------------------------------------------------------
def run_quickstart(
    model: str | os.PathLike | None = None,
    output: str | os.PathLike = "mhc-quickstart",
    steps: int = 60,
    num_streams: int = 4,
    lr: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    log=print,
) -> QuickstartReport:
    """Converts, checks, fine-tunes, generates, saves and reloads; see the module docstring.

    Args:
        model: a Llama / Mistral / Qwen2 checkpoint folder or Hub id; by default a small random Llama is built.
        output: folder for everything the quickstart writes (`llama/`, `converted/`, `finetuned/`, the report). An
            existing folder is replaced only if it holds nothing but a previous quickstart's output, or with
            `overwrite`; the old folder is kept aside until the run has finished (see `transformers_mhc.outputs`).
        steps: fine-tuning steps on the built-in text.
        num_streams: residual streams of the converted model.
        lr: learning rate; defaults to 3e-3 for the random model and 1e-3 for a given checkpoint.
        seed: seed of the random model, the conversion and the batches.
        overwrite: replace an existing `output` even if it was not written by the quickstart.
        threads: intra-op threads; defaults to 1 for checkpoints under 80 MB (their matmuls are too small to gain
            from threads, and a busy CPU makes threads much slower), else torch's default.
        progress: show the fine-tuning progress bar.
        log: where the report lines go.

    Every argument (and `model`, when given) is checked before anything is written; a bad one raises `ValueError`
    (`ConversionError` for `model`) naming it.
    """
    _check_arguments(steps=steps, num_streams=num_streams, lr=lr, seed=seed, threads=threads)
    if model is not None:
        try:
            source_path = resolve_source(model)
            load_source_config(source_path)
            check_weight_files(source_path)
        except ConversionError as error:
            raise ConversionError(f"--model: {error}") from None
    candidate = Path(output).expanduser()
    if candidate.is_dir() and not candidate.is_symlink() and not overwrite and not _is_own_output(candidate):
        foreign = sorted(child.name for child in candidate.iterdir() if child.name not in OWN_ENTRIES)
        what = (
            ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "") if foreign else f"no {REPORT_FILE}"
        )
        raise ValueError(
            f"--output {candidate.absolute()} holds files the quickstart did not write ({what}); pass --overwrite "
            f"to replace it, or choose another --output."
        )
    try:
        folder = OutputFolder(
            output,
            overwrite=overwrite,
            what="--output",
            in_place=True,
            is_complete=lambda path: (path / REPORT_FILE).is_file(),
            may_replace=_is_own_output,
        )
    except OutputError as error:
        raise ValueError(str(error)) from None
    output = folder.path
    if model is not None and (source_path.resolve() == output or output in source_path.resolve().parents):
        raise ValueError(f"--model {model} is inside --output {output}, which the quickstart would replace.")
    with folder:
        report = _run_steps(folder.path, model, steps, num_streams, lr, seed, threads, progress, log)
        folder.commit()
    return report


def _run_steps(
    output: Path,
    model: str | os.PathLike | None,
    steps: int,
    num_streams: int,
    lr: float | None,
    seed: int,
    threads: int | None,
    progress: bool,
    log,
) -> QuickstartReport:
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> float:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now
        return seconds[name]

    threads_before = torch.get_num_threads()
    try:
        # 1. Source checkpoint.
        if model is None:
            source = build_tiny_llama(output / "llama", seed=seed)
            description = (
                "a small random Llama (2 layers, hidden 64, 4 heads / 2 KV heads) with a byte-level BPE"
            )
            lr = 3e-3 if lr is None else lr
        else:
            source = resolve_source(model)
            description = f"the checkpoint {model}"
            lr = 1e-3 if lr is None else lr
        weight_bytes = sum(f.stat().st_size for f in Path(source).glob("*.safetensors"))
        torch.set_num_threads(threads or (1 if weight_bytes < SMALL_CHECKPOINT_BYTES else threads_before))
        log(f"1. source     {description} ({source})  [{lap('source'):.1f} s]")

        # 2. Conversion, with the options that let h_res learn (exact all the same).
        converted = output / "converted"
        conversion = convert_llama_to_mhc(
            source, converted, num_streams=num_streams, res_logit_gap=1.0, symmetry_breaking=0.1, seed=seed
        )
        log(
            f"2. convert    mhc with {num_streams} streams: max |logit diff| {conversion.max_abs_logit_diff:.2g} over "
            f"{conversion.num_tokens} tokens, greedy continuation {conversion.greedy_agreement:.0%} of "
            f"{conversion.greedy_tokens} tokens identical  [{lap('convert'):.1f} s]"
        )

        # 3. Fine-tuning on the built-in text.
        tokenizer = AutoTokenizer.from_pretrained(converted)
        with quiet_transformers():
            mhc = MHCForCausalLM.from_pretrained(converted, dtype=torch.float32)
        text = load_text()
        ids = text_token_ids(tokenizer, text)
        loss_before = evaluate_loss(mhc, ids, seq_len=64)
        torch.manual_seed(seed)
        losses = fine_tune(mhc, ids, steps=steps, lr=lr, seed=seed, progress=progress)
        loss_after = evaluate_loss(mhc, ids, seq_len=64)
        log(
            f"3. fine-tune  {steps} steps on the built-in text ({len(ids)} tokens): loss {loss_before:.3f} -> "
            f"{loss_after:.3f}  [{lap('fine-tune'):.1f} s]"
        )

        # 4. Generation.
        prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            generated_ids = mhc.generate(
                prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                do_sample=False,
                max_new_tokens=40,
                pad_token_id=tokenizer.eos_token_id,
            )
        generated = tokenizer.decode(generated_ids[0, prompt_ids.shape[1] :], skip_special_tokens=True)
        log(f"4. generate   {PROMPT!r} -> {' '.join(generated.split())!r}  [{lap('generate'):.1f} s]")

        # 5. Save with a card and the model code.
        finetuned = output / "finetuned"
        card = build_model_card(
            mhc,
            base_model=str(source),
            extra_notes=(
                f"Produced by `transformers-mhc quickstart`: converted from `{Path(str(source)).name}` "
                f"(max |logit diff| {conversion.max_abs_logit_diff:.2g} at conversion), then fully fine-tuned for "
                f"{steps} steps on the opening of *Alice's Adventures in Wonderland* (public domain); loss "
                f"{loss_before:.3f} -> {loss_after:.3f}. A demonstration, not a useful language model."
            ),
        )
        with quiet_transformers():
            save_for_hub(mhc, finetuned, tokenizer=tokenizer, card=card)
        log(f"5. save       {finetuned} (weights, config with auto_map, model code, tokenizer, README.md)")

        # 6. Reload where the package is not importable.
        batch = fixed_batch(tokenizer, mhc.config.vocab_size, mhc.config.max_position_embeddings)
        with torch.no_grad():
            expected = mhc(batch).logits
        reloaded, info = reload_in_fresh_process(finetuned, batch, threads=torch.get_num_threads())
        reload_diff = float((reloaded - expected).abs().max())
        log(
            f"6. reload     fresh process, transformers_mhc importable: {info['package_importable']}, "
            f"trust_remote_code=True -> {info['class']}: max |logit diff| {reload_diff:.2g}  [{lap('reload'):.1f} s]"
        )
    finally:
        torch.set_num_threads(threads_before)

    seconds["total"] = time.perf_counter() - start
    report = QuickstartReport(
        source=str(source),
        output=str(output),
        num_streams=num_streams,
        conversion_max_abs_logit_diff=conversion.max_abs_logit_diff,
        conversion_greedy_identical=conversion.greedy_identical,
        conversion_greedy_tokens=conversion.greedy_tokens,
        steps=steps,
        losses=losses,
        loss_before=loss_before,
        loss_after=loss_after,
        prompt=PROMPT,
        generated=generated,
        finetuned_path=str(finetuned),
        reload_max_abs_logit_diff=reload_diff,
        reload_class=info["class"],
        reload_package_importable=info["package_importable"],
        seconds=seconds,
    )
    (output / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    for name, passed in report.checks.items():
        log(f"   [{'ok' if passed else 'FAILED'}] {name}")
    log(
        f"{'all checks passed' if report.ok else 'SOME CHECKS FAILED'} in {seconds['total']:.1f} s; report: {output / REPORT_FILE}"
    )
    return report


def _check_arguments(steps: int, num_streams: int, lr: float | None, seed: int, threads: int | None) -> None:
    def integer(name: str, value, minimum: int, maximum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        if value > maximum:
            raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}.")

    integer("steps", steps, 1, MAX_STEPS)
    integer("num_streams", num_streams, 1, MAX_STREAMS)
    integer("seed", seed, 0, 2**63 - 1)
    if threads is not None:
        integer("threads", threads, 1, 4096)
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0
    ):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}.")


def _is_own_output(path: Path) -> bool:
    """A folder holding a previous quickstart's report and nothing the quickstart does not write."""
    names = {child.name for child in path.iterdir()}
    return not names or (REPORT_FILE in names and names <= OWN_ENTRIES)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `transformers-mhc quickstart`."""
    parser = subparsers.add_parser(
        "quickstart",
        help="convert a Llama to mHC, check it, fine-tune, generate, save and reload it (offline, ~20 s on 2 CPU cores)",
        description=(
            "End-to-end tour: convert a Llama checkpoint (default: a small random Llama built offline) to manifold-"
            "constrained hyper-connections, check that the logits are unchanged, fine-tune briefly on a built-in "
            "public-domain text, generate, save with a model card, and reload with trust_remote_code=True in a fresh "
            "process where transformers_mhc is not importable."
        ),
    )
    parser.add_argument(
        "--model", default=None, help="Llama/Mistral/Qwen2 folder or Hub id (default: build one)"
    )
    parser.add_argument(
        "--output", default="mhc-quickstart", help="output folder (default: ./mhc-quickstart)"
    )
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps (default: 60)")
    parser.add_argument("--num-streams", type=int, default=4, help="residual streams (default: 4)")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 3e-3 random, 1e-3 given)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: 1 for small models)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output even if it is not ours")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        report = run_quickstart(
            model=args.model,
            output=args.output,
            steps=args.steps,
            num_streams=args.num_streams,
            lr=args.lr,
            seed=args.seed,
            overwrite=args.overwrite,
            threads=args.threads,
        )
    except (ConversionError, ValueError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"transformers-mhc quickstart: error: {error}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


__all__ = [
    "QuickstartReport",
    "add_subparser",
    "build_tiny_llama",
    "build_tokenizer",
    "evaluate_loss",
    "fine_tune",
    "reload_in_fresh_process",
    "run_quickstart",
]
