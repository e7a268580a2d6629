"""`rs soup`: interpolate N checkpoints or N LoRA adapters into one, theta = sum_i w_i theta_i.

Full weights (safetensors files or HF folders, Lightning .ckpt, torch .pt/.bin) are merged out of core by
`rs_lightning.soup.io.merge_files`; PEFT adapter folders become one adapter (`lora_soup`), or a full model
when `--base` names the base model they were trained on. Only torch and safetensors are imported (peft,
transformers and Lightning are not needed), so the command starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
import time
from pathlib import Path

DESCRIPTION = """\
Interpolate N checkpoints (or N LoRA adapters) fine-tuned from one shared init into a single model.

Weight convention: the weights are aligned with the sources, in order, and
    theta = sum_i w_i * theta_i
so for two sources `--weights 0.7 0.3` means 70% of the first and 30% of the second (equivalently
`--lam 0.3`: lam is the weight of the SECOND source). Weights must be >= 0 and sum to 1, unless
--allow-extrapolation (negative weights allowed, the sum must still be 1). One-hot weights reproduce
that source bit for bit.

Sources may be .safetensors files, Hugging Face model folders (single or sharded safetensors),
Lightning .ckpt files (use --prefix to pick the network, e.g. --prefix policy.), torch .pt/.bin state
dicts, or PEFT LoRA adapter folders. Adapters and full weights cannot be mixed."""

EPILOG = """\
examples:
  rs soup expert_a/ expert_b/ --weights 0.7 0.3 --out soup/
  rs soup a.ckpt b.ckpt --lam 0.5 --prefix policy. --dtype bfloat16 --out soup/
  rs soup lora_a/ lora_b/ lora_c/ --weights 0.2 0.3 0.5 --mode factors --out lora_soup/
  rs soup lora_a/ lora_b/ --weights 0.5 0.5 --mode delta --base base_model/ --out merged/
  rs soup expert_a/ expert_b/ --weights 0.5 0.5 --method ties --base init/ --density 0.2 --out ties/
  rs soup expert_a/ expert_b/ --lam 0.3 --method slerp --out slerp/
  rs soup expert_a/ expert_b/ --lam 0.3 --method fisher --fisher fa.safetensors fb.safetensors --out fisher/

exit status: 0 written; 2 bad arguments, sources or output location (nothing written); 1 the machine
failed the write (disk full, I/O error: nothing left behind); 130 interrupted."""

# The registry's names, without importing torch for --help (tests/test_soup_methods_cli.py checks they agree).
METHOD_NAMES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "fisher")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "5GB" (10^9, the Hugging Face convention), "2GiB" (2^30), "500MB", "1000000" ..."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "b").lower()
    if unit == "b":
        size = int(float(m.group(1)))
        if size <= 0:
            raise argparse.ArgumentTypeError(f"the shard size must be > 0 bytes, got {text!r}")
        return size
    power = "kmgt".index(unit[0]) + 1
    base = 1024 if "i" in unit else 1000
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"the shard size must be > 0 bytes, got {text!r}")
    return size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like every other `rs soup` error (argparse would print the whole usage block first).
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rs soup", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="checkpoints or adapter folders, in weight order")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per source, aligned with SRC: theta = sum_i w_i theta_i (e.g. 0.7 0.3)")
    w.add_argument("--lam", type=float, help="two sources only: the weight of the SECOND one (weights 1-lam, lam)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--mode", choices=("factors", "delta"),
                   help="LoRA adapters only. factors (default, the paper): average A and B separately; "
                        "delta: the exact sum_i w_i B_i A_i as one LoRA of rank sum_i r_i")
    p.add_argument("--allow-extrapolation", action="store_true",
                   help="allow negative weights (the weights must still sum to 1)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="cast floating outputs (default: keep the sources' dtype)")
    p.add_argument("--prefix", help="keep only keys starting with PREFIX, stripped (e.g. policy. in a Lightning ckpt)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", metavar="SIZE",
                   help="largest output shard, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--base", type=Path, metavar="BASE",
                   help="full weights: theta_0, the shared initialisation the task-vector methods need "
                        "(task_arithmetic, ties, dare_linear, dare_ties). LoRA adapters: merge the adapter soup into "
                        "this base model and write full weights (with --mode delta this is exactly sum_i w_i theta_i "
                        "of the experts merged into the base)")
    m = p.add_argument_group("merge method (full weights; see rs_lightning/soup/methods/)")
    m.add_argument("--method", default="linear", choices=METHOD_NAMES,
                   help="linear (default: the rewarded soup); task_arithmetic, ties, dare_linear, dare_ties (task "
                        "vectors on --base); slerp (two sources, t = the second weight); fisher (--fisher files)")
    m.add_argument("--density", type=float, help="ties: fraction of each task vector kept by magnitude (default 0.2)")
    m.add_argument("--drop-rate", type=float, help="dare_*: fraction of each task vector dropped (default 0.9)")
    m.add_argument("--seed", type=int, help="dare_*: seed of the drop masks (default 0; per tensor, repeatable)")
    m.add_argument("--scaling", type=float,
                   help="task-vector methods: theta_0 + scaling * merged task vector (default 1)")
    m.add_argument("--fisher", nargs="+", type=Path, metavar="F",
                   help="fisher: one diagonal-Fisher safetensors per source, in source order (from rs fisher)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="soup sources holding NaN/inf (refused by default, naming the key and the file)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on for merges reading more than 1 GiB)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `rs soup`; return the exit code (see EPILOG): every failure is one line on stderr, no traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own "rs soup: error: ..." (already printed)
        return int(exit_.code or 0)
    from rs_lightning.soup.atomic import RESOURCE_ERRNOS
    from rs_lightning.soup.errors import SoupError

    try:
        with _terminate_cleanly():
            print(run(args))
    except (SoupError, FileExistsError) as err:
        return _error(err, 2)
    except OSError as err:
        # The writers name the output in the message; strip the "[Errno N]" prefix OSError adds.
        text = str(err).split("] ", 1)[-1] if str(err).startswith("[Errno") else str(err)
        return _error(text, 1 if err.errno in RESOURCE_ERRNOS else 2)
    except MemoryError:
        return _error("out of memory (a streaming merge holds ~(K+1) x the largest tensor; --base holds the base)", 1)
    except KeyboardInterrupt:
        return _error("interrupted (nothing was written)", 130)  # SIGINT, or SIGTERM (see _terminate_cleanly)
    return 0


@contextlib.contextmanager
def _terminate_cleanly():
    """SIGTERM (`kill`, a scheduler's timeout) becomes an exception, so the temporary output is removed on the
    way out; Python's default would die on the spot. Only SIGKILL leaves one, which the next run cleans."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(err, code: int) -> int:
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    print(f"rs soup: error: {lines[0]}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> str:
    """Do the soup described by parsed arguments; return the summary line.

    Everything that can be checked without reading weights is checked first (weights, paths, the output
    location and its overlap with the inputs); then the output is locked for the whole run.
    """
    from rs_lightning.soup import io, lora
    from rs_lightning.soup.errors import SoupError
    from rs_lightning.soup.lock import output_lock
    from rs_lightning.soup.methods import get_method
    from rs_lightning.soup.methods.merge import check_method_weights
    from rs_lightning.soup.paths import check_output
    from rs_lightning.soup.sources import check_input_path

    if args.lam is not None:
        if len(args.sources) != 2:
            raise SoupError(f"--lam needs exactly two sources, got {len(args.sources)}: use --weights")
        weights = [1.0 - args.lam, args.lam]
    else:
        weights = args.weights
    method = get_method(args.method)
    given = {"density": args.density, "drop_rate": args.drop_rate, "seed": args.seed, "scaling": args.scaling}
    for name, value in given.items():
        if value is not None and name not in method.options:
            flag = "--" + name.replace("_", "-")
            raise SoupError(f"{flag} does not apply to --method {method.name} (its options: "
                            f"{', '.join(method.options) or 'none'})")
    options = method.resolve_options({k: v for k, v in given.items() if v is not None})
    if args.fisher is not None and not method.needs_fisher:
        raise SoupError(f"--fisher applies to --method fisher, not {method.name}")
    weights = check_method_weights(method, weights, len(args.sources), args.allow_extrapolation)
    extra = [*([args.base] if args.base is not None else []), *(args.fisher or [])]
    for src in [*args.sources, *extra]:
        check_input_path(Path(src))
    inputs = [*args.sources, *extra]
    check_output(args.out, inputs=inputs, overwrite=args.overwrite)
    is_adapter = [lora.is_peft_adapter_dir(s) for s in args.sources]
    if any(is_adapter) and not all(is_adapter):
        adapters = [str(s) for s, a in zip(args.sources, is_adapter) if a]
        full = [str(s) for s, a in zip(args.sources, is_adapter) if not a]
        raise SoupError(
            f"sources mix PEFT adapter folders ({', '.join(adapters)}) and full weights ({', '.join(full)}): "
            "soup adapters together (optionally with --base), or full checkpoints together"
        )
    if not all(is_adapter):
        if args.mode is not None:
            raise SoupError("--mode applies to LoRA adapter folders only; these sources are full weights")
        if args.base is not None and not method.needs_base:
            raise SoupError(f"--base is theta_0 for the task-vector methods; --method {method.name} does not use it "
                            "(for adapters it names the base model)")
    elif method.name != "linear":
        # A LoRA expert's task vector is B A, not A and B: merging factors with TIES/DARE/slerp/Fisher would
        # merge something else than the experts. Fold each adapter into the base first (rs soup A --weights 1
        # --base BASE), then merge the full models with --method and --base theta_0.
        raise SoupError(f"--method {method.name} merges full weights; LoRA adapters support --method linear only "
                        "(--mode factors or delta). Merge each adapter into its base first, then merge those")
    elif args.base is None and args.prefix:
        raise SoupError("--prefix applies to full weights and --base, not to adapter soups")
    with output_lock(args.out, what="output folder"):
        if all(is_adapter):
            return _adapter_soup(args, weights)
        result = io.merge_files(
            args.sources, weights, args.out, dtype=args.dtype, allow_extrapolation=args.allow_extrapolation,
            max_shard_bytes=args.max_shard_size, prefix=args.prefix, overwrite=args.overwrite,
            progress=args.progress, allow_nonfinite=args.allow_nonfinite, method=method.name, options=options,
            base=args.base, fisher=args.fisher,
        )
    if method.name != "linear":
        return result.summary(f"method {method.name}")
    return result.summary()


def _adapter_soup(args: argparse.Namespace, weights: list[float]) -> str:
    from rs_lightning.soup import io, lora
    from rs_lightning.soup.errors import SoupError

    start = time.perf_counter()
    mode = args.mode or "factors"
    extra = dict(allow_extrapolation=args.allow_extrapolation, allow_nonfinite=args.allow_nonfinite)
    adapters = [lora.load_adapter(s) for s in args.sources]
    dtype = io.parse_dtype(args.dtype)
    info = io.soup_record(args.sources, weights, mode=mode, dtype=args.dtype,
                          allow_extrapolation=args.allow_extrapolation, base=str(args.base) if args.base else None)
    if args.base is None:
        soup = lora.lora_soup(adapters, weights, mode=mode, **extra)
        if dtype is not None:
            soup.state_dict = _cast(soup.state_dict, dtype, args.allow_nonfinite)
        lora.save_adapter(soup, args.out, overwrite=args.overwrite, extra_json=info)
        n = len(soup.state_dict)
        size = sum(t.numel() * t.element_size() for t in soup.state_dict.values())
        result = io.SaveResult(args.out, [lora.SAFETENSORS_NAME], n, size, time.perf_counter() - start)
        return result.summary(f"LoRA adapter, mode {mode}")
    with io.open_source(args.base, prefix=args.prefix) as base:
        if base.kind == "peft-adapter":
            raise SoupError(f"--base {args.base} is an adapter folder: give the base model it was trained on")
        base_sd = {k: base[k] for k in base}
        copy_from = base.folder
    if mode == "factors":
        # The paper's soup merged: one adapter from averaged factors, folded into the base with weight 1.
        adapters = [lora.lora_soup(adapters, weights, mode="factors", **extra)]
        merge_weights = [1.0]
    else:
        merge_weights = weights
    merged = lora.merge_lora_into_base(base_sd, adapters, merge_weights, **extra)
    if dtype is not None:
        merged = _cast(merged, dtype, args.allow_nonfinite)
    del base_sd
    result = io.save_safetensors(merged, args.out, max_shard_bytes=args.max_shard_size, soup_info=info,
                                 overwrite=args.overwrite, copy_from=copy_from, config_dtype=dtype)
    result.seconds = time.perf_counter() - start
    return result.summary(f"base + LoRA soup, mode {mode}")


def _cast(state: dict, dtype, allow_nonfinite: bool) -> dict:
    """--dtype for adapter soups; a narrowing cast that overflows is refused like a non-finite source."""
    from rs_lightning.soup.values import check_finite_result

    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if not allow_nonfinite:
        for k, v in out.items():
            check_finite_result(v, k, f" (cast to {str(dtype).removeprefix('torch.')})")
    return out
