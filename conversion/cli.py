"""`transformers-mhc convert SOURCE OUTPUT`: the command-line front end of `convert_llama_to_mhc`."""

from __future__ import annotations

import argparse
import json
import sys

from transformers_mhc.models.configuration_mhc import MHCConfig

from .convert import convert_llama_to_mhc
from .plan import DTYPES, HYPER_CONNECTIONS, SUPPORTED_MODEL_TYPES, ConversionError


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Registers the `convert` sub-command."""
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    parser = subparsers.add_parser(
        "convert",
        help=f"retrofit a pretrained Llama-style checkpoint ({supported}) with hyper-connections",
        description=(
            "Convert a Llama, Mistral or Qwen2 causal LM into an MHC model that computes the same function: the "
            "weights are copied unchanged and the hyper-connections start at the identity. Every argument is checked "
            "before anything is written. OUTPUT is owned by one conversion at a time (the lock file "
            ".OUTPUT.transformers-mhc.lock), written into .OUTPUT.transformers-mhc/ and moved into place when "
            "complete; an old OUTPUT is replaced only then, and only with --overwrite. SOURCE is never modified. The exactness "
            "(max abs logit difference, greedy continuation agreement) is measured and written into the model card "
            "and OUTPUT/mhc_conversion.json."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help="local checkpoint folder or Hub repository id")
    parser.add_argument("output", metavar="OUTPUT", help="folder to create")
    parser.add_argument("--num-streams", type=int, default=4, help="residual streams n (default: 4)")
    parser.add_argument("--hyper-connection", choices=HYPER_CONNECTIONS, default="mhc", help="default: mhc")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the converted weights (default: SOURCE's)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it exists, once the new one is complete (a symlink: the folder it points to)",
    )
    parser.add_argument(
        "--res-logit-gap",
        type=float,
        default=MHCConfig.hc_res_logit_gap,
        help=(
            f"diagonal logit gap of h_res (default: {MHCConfig.hc_res_logit_gap}); smaller (e.g. 1.0) lets h_res "
            "learn to mix streams; exact for any value"
        ),
    )
    parser.add_argument(
        "--symmetry-breaking",
        type=float,
        default=MHCConfig.hc_symmetry_breaking,
        help=(
            f"spread of h_post over [1-s, 1+s] in [0, 1) (default: {MHCConfig.hc_symmetry_breaking}); e.g. 0.1 "
            "lets the copied streams diverge; exact for any value"
        ),
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the exactness measurement against SOURCE"
    )
    parser.add_argument("--revision", default=None, help="Hub revision when SOURCE is a repository id")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        report = convert_llama_to_mhc(
            args.source,
            args.output,
            num_streams=args.num_streams,
            hyper_connection=args.hyper_connection,
            dtype=args.dtype,
            overwrite=args.overwrite,
            res_logit_gap=args.res_logit_gap,
            symmetry_breaking=args.symmetry_breaking,
            max_shard_size=args.max_shard_size,
            verify=not args.no_verify,
            revision=args.revision,
        )
    except ConversionError as error:
        if getattr(args, "debug", False):
            raise
        print(f"transformers-mhc convert: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0
