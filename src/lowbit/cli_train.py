"""``lowbit qat``: quantization-aware training of a causal LM by distillation from the original."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from lowbit.errors import LowbitError
from lowbit.training.blockwise import BlockOptions
from lowbit.workflow_qat import QATOptions

BLOCK_DEFAULTS = BlockOptions()
QAT_DEFAULT_BLOCK_WINDOWS = QATOptions().block_windows

QAT_EXAMPLES = """examples:
  lowbit qat --scheme W2A16 --group-size 64 --asym --method gptq --act-order --steps 200
  lowbit qat --scheme W3A16 --asym --method awq+gptq --minutes 60          # stops after 60 minutes of training
  lowbit qat --gguf-type TQ2_0 --out out/tq2-qat   # ternary where llama.cpp's TQ2_0 fits, its fallbacks elsewhere
  lowbit qat ... --resume                  # continue an interrupted run from its last saved step
  lowbit export gguf out/ternary-qat --type TQ2_0    # trained grids that match a GGUF type are written as is
"""


def add_train_parsers(sub: Any) -> None:
    """Register ``qat`` on the CLI's subparsers."""
    p = sub.add_parser("qat", help="quantization-aware training: distil the original into its quantized twin",
                       epilog=QAT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="HF folder, .gguf file, or built-in 'smollm2' (default)")
    p.add_argument("--scheme", default="W4A16", help="W4A16 (default), W3A16, W2A16, W8A16, TERNARY, BINARY")
    p.add_argument("--method", default="rtn", help="post-training start: rtn (default), gptq, awq, awq+gptq")
    p.add_argument("--group-size", type=int, help="quantize in groups of N along the input dimension")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--asym", dest="symmetric", action="store_false", default=None, help="codes with a zero point")
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="signed codes, no zero point")
    p.add_argument("--gguf-type", metavar="TYPE", help="train on the grids llama.cpp's TYPE mix gives each tensor "
                   "(TQ2_0, TQ1_0, Q4_0, Q8_0 and their fallbacks), so 'lowbit export gguf OUT --type TYPE' writes "
                   "the trained codes as they are")
    p.add_argument("--rule", action="append", default=[], metavar="PATTERN=SPEC", help="as lowbit quantize")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN", help="keep matching modules in float")
    p.add_argument("--embeddings", metavar="int8|int4|keep|SPEC", help="token embedding, as lowbit quantize")
    p.add_argument("--out", help="output folder (default out/<model>-<scheme>...-qat)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue from <out>.qat-state (same model, data, options)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation against the original")
    p.add_argument("--json", action="store_true", help="print report.json instead of a table")
    p.add_argument("--text", help="evaluation text (default: pydoc topics); its evaluation windows are never trained on")
    p.add_argument("--windows", type=int, default=8, help="LM evaluation windows (default 8)")
    p.add_argument("--window-length", type=int, default=512, help="tokens per evaluation window (default 512)")
    t = p.add_argument_group("training")
    t.add_argument("--train-text", help="training text, plain or .jsonl (default: the evaluation text after its "
                   "evaluation windows)")
    t.add_argument("--train-length", type=int, default=512, help="tokens per training window (default 512)")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    t.add_argument("--batch", type=int, default=4, help="windows per optimizer step (default 4)")
    t.add_argument("--micro-batch", type=int, default=2, help="windows per forward/backward pass (default 2)")
    t.add_argument("--lr", type=float, default=None, help="learning rate of the latent weights (default 2e-4)")
    t.add_argument("--lr-quant", type=float, default=None, help="learning rate of steps and zero points (default 1e-4)")
    t.add_argument("--ce-weight", type=float, default=0.0, help="weight of cross-entropy on the text next to the "
                   "KL to the original (default 0: pure distillation)")
    t.add_argument("--minutes", type=float, help="stop training after this many minutes (the result is written)")
    t.add_argument("--eval-every", type=int, default=25, help="log held-out KLD every N steps (default 25)")
    t.add_argument("--checkpoint-every", type=int, default=25, help="save a resumable state every N steps (default 25)")
    t.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="training precision (auto: bf16 autocast where the CPU or GPU runs bf16 natively)")
    t.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing them "
                   "(faster, more memory)")
    b = p.add_argument_group("block-wise phase (before end-to-end training)")
    b.add_argument("--block-epochs", type=int, default=BLOCK_DEFAULTS.epochs,
                   help=f"passes over the block-wise windows per decoder block (default {BLOCK_DEFAULTS.epochs}; 0 skips "
                        "the phase)")
    b.add_argument("--block-windows", type=int, default=QAT_DEFAULT_BLOCK_WINDOWS,
                   help=f"training windows of the block-wise phase (default {QAT_DEFAULT_BLOCK_WINDOWS})")
    b.add_argument("--block-lr", type=float, default=BLOCK_DEFAULTS.lr_weights,
                   help=f"learning rate of the latent weights per block (default {BLOCK_DEFAULTS.lr_weights:g})")
    c = p.add_argument_group("calibration of the post-training start (gptq, awq)")
    c.add_argument("--calib-text", help="calibration text (default: pydoc topics after the evaluation part)")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default 128)")
    c.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by descending Hessian diagonal")
    p.set_defaults(handler=cmd_qat)


def qat_options(args: argparse.Namespace):
    """The QATOptions these arguments ask for."""
    from lowbit.training.loop import TrainOptions
    from lowbit.workflow import CalibrationOptions, EvalOptions, QuantizeOptions

    if args.steps <= 0 or args.batch <= 0 or args.micro_batch <= 0 or args.train_length < 2:
        raise LowbitError("--steps, --batch and --micro-batch must be positive and --train-length at least 2")
    if args.batch % args.micro_batch:
        raise LowbitError(f"--batch ({args.batch}) must be a multiple of --micro-batch ({args.micro_batch})")
    if args.block_epochs < 0 or args.block_windows <= 0:
        raise LowbitError("--block-epochs must be 0 or more and --block-windows positive")
    if args.calib_samples <= 0:
        raise LowbitError("--calib-samples must be positive")
    defaults = TrainOptions()
    train = TrainOptions(
        steps=args.steps, batch_windows=args.batch, micro_batch=args.micro_batch,
        lr_weights=defaults.lr_weights if args.lr is None else args.lr,
        lr_quant=defaults.lr_quant if args.lr_quant is None else args.lr_quant,
        ce_weight=args.ce_weight, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        max_minutes=args.minutes, dtype=args.dtype, checkpointing=not args.no_checkpointing)
    quantize = QuantizeOptions(
        model=args.model, scheme=args.scheme, method=args.method, group_size=args.group_size,
        symmetric=args.symmetric, rules=tuple(args.rule), ignore=tuple(args.ignore), embeddings=args.embeddings,
        out=args.out, force=args.force, evaluate=not args.no_eval,
        eval=EvalOptions(text=args.text, windows=args.windows, length=args.window_length),
        calibration=CalibrationOptions(args.calib_text, args.calib_samples),
        method_options=(("act_order", True),) if args.act_order else ())
    return QATOptions(quantize=quantize, train=train, text=args.train_text if args.train_text else args.text,
                      length=args.train_length, resume=args.resume, gguf_type=args.gguf_type,
                      blocks=replace(BLOCK_DEFAULTS, epochs=args.block_epochs, lr_weights=args.block_lr,
                                     lr_quant=args.block_lr / 2, max_minutes=args.minutes, dtype=args.dtype),
                      block_windows=args.block_windows)


def cmd_qat(args: argparse.Namespace) -> None:
    from lowbit.memory import reuse_freed_blocks
    from lowbit.report import print_report
    from lowbit.workflow_qat import qat_job

    reuse_freed_blocks()  # training re-allocates the same activations every step
    report, out_dir = qat_job(qat_options(args), progress=True)  # the bar is on stderr, JSON on stdout
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print_report(report)
    qat = report["qat"]
    start = (qat.get("start_eval") or {}).get("kld")
    end = (report.get("eval") or {}).get("kld")
    if start is not None and end is not None:
        print(f"QAT: {qat['steps_done']} steps from {qat['init']}: KLD {start:.4f} -> {end:.4f} "
              f"({end / start:.3f}x) in {(report['seconds']['train'] + (report['seconds']['blocks'] or 0)) / 60:.1f} min "
              "of training (block-wise and end to end)")
    print(f"wrote {out_dir}")
