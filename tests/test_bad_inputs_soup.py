# ruff: noqa: E501  (the case table reads best one case per line)
"""Bad inputs to `rs soup`: each one is a clean, one-line error and leaves nothing behind (the Python API's
are in test_bad_inputs_soup_api.py).

Every case asserts: the exit code (2 for what the user can fix, 1 when the machine failed the write), one
line on stderr starting "rs soup: error:" that names the problem, no traceback, no hostile pickle executed,
and the folder of the case byte-for-byte as it was (no output, no temporary, no lock file, inputs intact).

`python tests/test_bad_inputs_soup.py` prints the tally (tried, clean, tracebacks, silent acceptances,
unclear messages, leftovers) instead of asserting, e.g. to measure an older version of the package.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soup_cases import (  # noqa: E402
    MARKER,
    adapter,
    base,
    evil_torch,
    hf_folder,
    lock_holder,
    mounted_tmpfs,
    snapshot,
    st_file,
    state,
    two,
)
from test_bad_inputs_soup_api import API_CASES, classify_api  # noqa: E402

W = ["--weights", "0.5", "0.5"]



def out(d: Path):
    return ["--out", d / "soup"]


def _header_file(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _evil_base(d, mp):
    return [adapter(d / "l1", 1), adapter(d / "l2", 2), *W, "--base", evil_torch(d / "evil.ckpt"), *out(d)]


def _readonly(d, mp):
    ro = d / "ro"
    stack = contextlib.ExitStack()
    if os.geteuid() == 0:
        if not stack.enter_context(mounted_tmpfs(ro, "ro,size=64k")):
            pytest.skip("read-only location needs a tmpfs mount as root")
    else:
        ro.mkdir()
        ro.chmod(0o555)
        stack.callback(ro.chmod, 0o755)
    CLEANUPS.append(stack)
    return [*two(d), *W, "--out", ro / "soup"]


def _disk_full_patched(d, mp):
    from rs_lightning.soup import writer

    real = writer._write_file

    def full_after_one_file(file, *args, **kwargs):
        if any(file.parent.glob("*.safetensors")):  # the second shard: the disk is now full
            with open(file, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, *args, **kwargs)

    mp.setattr(writer, "_write_file", full_after_one_file)
    return [*two(d), *W, "--max-shard-size", "40B", *out(d)]


def _disk_full_tmpfs(d, mp):
    big = [{"w": torch.randn(256, 256), "b": torch.randn(4)}, {"w": torch.randn(256, 256), "b": torch.randn(4)}]
    small = d / "small"
    stack = contextlib.ExitStack()
    if not stack.enter_context(mounted_tmpfs(small, "size=64k")):
        pytest.skip("a real full disk needs a tmpfs mount as root")
    CLEANUPS.append(stack)
    return [hf_folder(d / "a", big[0]), hf_folder(d / "b", big[1]), *W, "--out", small / "soup"]


def _in_use(d, mp):
    srcs = two(d)
    pid = lock_holder(d / "soup", CLEANUPS)
    return [*srcs, *W, *out(d)], rf"in use by pid {pid}"


def _fifo(d, mp):
    os.mkfifo(d / "pipe.safetensors")
    return [d / "pipe.safetensors", hf_folder(d / "b", state(1)), *W, *out(d)]


def _index_escape(d, mp):
    f = hf_folder(d / "a", state(0))
    (f / "model.safetensors").rename(d / "outside.safetensors")
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../outside.safetensors"
                                                                              for k in state(0)}}))
    return [f, hf_folder(d / "b", state(1)), *W, *out(d)]


def _index_missing(d, mp):
    f = d / "sharded"
    f.mkdir()
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    return [f, hf_folder(d / "b", state(1)), *W, *out(d)]


def _nonfinite(value, key="w"):
    def build(d, mp):
        bad = state(1)
        bad[key][1, 2] = value
        return [*two(d, state(0), bad), *W, *out(d)]
    return build


def _dot(d, mp):
    srcs = [st_file(d / "a.safetensors", state(0)), st_file(d / "b.safetensors", state(1))]
    mp.chdir(d)
    return [*srcs, *W, "--out", ".", "--overwrite"]


def _symlink_out(d, mp):
    a, b = two(d)
    (d / "link").symlink_to(a)
    return [a, b, *W, "--out", d / "link", "--overwrite"]


def _lora_rank(d, mp):
    return [adapter(d / "l1", 1, r=2), adapter(d / "l2", 2, r=4), *W, *out(d)]


def _lora_nan(d, mp):
    sd = {"base_model.model.l.lora_A.weight": torch.full((2, 4), float("nan")),
          "base_model.model.l.lora_B.weight": torch.ones(4, 2)}
    return [adapter(d / "l1", 1), adapter(d / "l2", 2, sd=sd), *W, *out(d)]


CLEANUPS: list[contextlib.ExitStack] = []
# name -> (builder(d, monkeypatch) -> args [or (args, regex)], exit code, regex the message must match)
CLI_CASES = {
    "missing source": (lambda d, mp: [hf_folder(d / "a", state(0)), d / "nope", *W, *out(d)], 2, r"no such file or folder: .*nope"),
    "dangling symlink source": (lambda d, mp: [(d / "ln").symlink_to(d / "gone") or d / "ln", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"ln is a dangling symlink"),
    "empty folder source": (lambda d, mp: [(d / "e").mkdir() or d / "e", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"e is a folder without model.safetensors"),
    "unknown suffix": (lambda d, mp: [(d / "x.txt").write_text("hi") and d / "x.txt", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"unknown checkpoint format '.txt'"),
    "garbage safetensors": (lambda d, mp: [(d / "g.safetensors").write_bytes(os.urandom(64)) and d / "g.safetensors", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"g.safetensors is not a valid safetensors file"),
    "empty safetensors": (lambda d, mp: [(d / "e.safetensors").touch() or d / "e.safetensors", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"e.safetensors is not a valid safetensors file"),
    "truncated safetensors": (lambda d, mp: [_header_file(d / "t.safetensors", {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 10), hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"'w' has offsets .* do not fit"),
    "unsupported safetensors dtype": (lambda d, mp: [_header_file(d / "u.safetensors", {"w": {"dtype": "F6_E2M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"unsupported dtype 'F6_E2M3'"),
    "garbage ckpt": (lambda d, mp: [(d / "g.ckpt").write_bytes(os.urandom(100)) and d / "g.ckpt", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"g.ckpt is neither a zip-format torch checkpoint"),
    "hostile ckpt (exec)": (lambda d, mp: [evil_torch(d / "e.ckpt", "exec"), evil_torch(d / "f.ckpt"), *W, *out(d)], 2, r"e.ckpt pickles a call to builtins.exec"),
    "hostile pt (os.system)": (lambda d, mp: [evil_torch(d / "e.pt", "system", lightning=False), hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"e.pt pickles a call to posix.system"),
    "hostile bin (subprocess)": (lambda d, mp: [evil_torch(d / "e.bin", "subprocess", lightning=False), hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"e.bin pickles a call to subprocess.call"),
    "hostile bare pickle .bin": (lambda d, mp: [evil_torch(d / "e.bin", legacy=True, lightning=False), hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"e.bin is neither a zip-format .* weights_only=True"),
    "hostile pytorch_model.bin folder": (lambda d, mp: [evil_torch(d / "m" / "pytorch_model.bin", lightning=False), hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"pytorch_model.bin pickles a call to builtins.exec"),
    "hostile adapter_model.bin": (lambda d, mp: [adapter(d / "l1", 1), (adapter(d / "l2", 2, bin_file=True), evil_torch(d / "l2" / "adapter_model.bin", lightning=False))[0], *W, *out(d)], 2, r"adapter_model.bin pickles a call to builtins.exec"),
    "hostile --base ckpt": (_evil_base, 2, r"evil.ckpt pickles a call to builtins.exec"),
    "pt holding a list": (lambda d, mp: [torch.save([torch.ones(2)], d / "l.pt") or d / "l.pt", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"l.pt holds a list, not a state dict"),
    "ckpt without state_dict": (lambda d, mp: [torch.save({"epoch": 1}, d / "n.ckpt") or d / "n.ckpt", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"n.ckpt has no 'state_dict'"),
    "pt with a non-tensor": (lambda d, mp: [torch.save({"w": 3}, d / "v.pt") or d / "v.pt", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"entry 'w' of the state dict is a int"),
    "key mismatch": (lambda d, mp: [*two(d, state(0), state(1) | {"extra": torch.ones(1)}), *W, *out(d)], 2, r"key 'extra' of source 1"),
    "shape mismatch": (lambda d, mp: [*two(d, state(0), state(1) | {"b": torch.ones(5)}), *W, *out(d)], 2, r"key 'b': source 1 .* has shape"),
    "dtype mismatch": (lambda d, mp: [*two(d, state(0), state(1) | {"b": torch.ones(4).half()}), *W, *out(d)], 2, r"key 'b': source 1 .* has dtype"),
    "weight count": (lambda d, mp: [*two(d), "--weights", "0.2", "0.3", "0.5", *out(d)], 2, r"got 3 weights for 2 sources"),
    "weight sum": (lambda d, mp: [*two(d), "--weights", "0.5", "0.4", *out(d)], 2, r"sum to 0.9"),
    "negative weight": (lambda d, mp: [*two(d), "--weights", "-0.5", "1.5", *out(d)], 2, r"weight 0 is -0.5 < 0"),
    "nan weight": (lambda d, mp: [*two(d), "--weights", "nan", "1", *out(d)], 2, r"weight 0 is nan"),
    "lam with 3 sources": (lambda d, mp: [*two(d), hf_folder(d / "c", state(2)), "--lam", "0.5", *out(d)], 2, r"--lam needs exactly two sources"),
    "prefix matches nothing": (lambda d, mp: [*two(d), *W, "--prefix", "zzz.", *out(d)], 2, r"prefix 'zzz.' matches no key"),
    "zero shard size": (lambda d, mp: [*two(d), *W, "--max-shard-size", "0", *out(d)], 2, r"shard size must be > 0"),
    "output exists": (lambda d, mp: [*two(d), *W, "--out", (d / "soup").mkdir() or d / "soup"], 2, r"output folder already exists"),
    "--out is a source folder (--overwrite)": (lambda d, mp: [*two(d), *W, "--out", d / "a", "--overwrite"], 2, r"--out .*a is the input .*a: writing there would overwrite"),
    "--out is a file of a source folder": (lambda d, mp: [*two(d), *W, "--out", d / "a" / "model.safetensors", "--overwrite"], 2, r"model.safetensors lies inside the input .*a:"),
    "--out inside a source folder": (lambda d, mp: [*two(d), *W, "--out", d / "a" / "soup"], 2, r"soup lies inside the input"),
    "--out holds the sources (--overwrite)": (lambda d, mp: [st_file(d / "run" / "a.safetensors", state(0)), st_file(d / "run" / "b.safetensors", state(1)), *W, "--out", d / "run", "--overwrite"], 2, r"run contains the input"),
    "--out symlink to a source": (_symlink_out, 2, r"link is the input"),
    "--out . holding the sources": (_dot, 2, r"contains the input"),
    "LoRA --out is an adapter": (lambda d, mp: [adapter(d / "l1", 1), adapter(d / "l2", 2), *W, "--out", d / "l1", "--overwrite"], 2, r"l1 is the input"),
    "LoRA --out is the base": (lambda d, mp: [adapter(d / "l1", 1), adapter(d / "l2", 2), *W, "--base", base(d / "B"), "--out", d / "B", "--overwrite"], 2, r"B is the input"),
    "--out is the root": (lambda d, mp: [*two(d), *W, "--out", "/", "--overwrite"], 2, r"cannot be the filesystem root"),
    "--out under a file": (lambda d, mp: [*two(d), *W, "--out", d / "a" / "config.json" / "soup"], 2, r"config.json is a file, so no folder"),
    "--out read-only": (_readonly, 2, r"cannot write in .*ro \((read-only filesystem|permission denied)\)"),
    "--out name of 300 chars": (lambda d, mp: [*two(d), *W, "--out", d / ("x" * 300)], 2, r"is longer than the 255 characters"),
    "source name of 300 chars": (lambda d, mp: [hf_folder(d / "a", state(0)), d / ("y" * 300), *W, *out(d)], 2, r"cannot use source .*File name too long"),
    "source is a pipe": (_fifo, 2, r"pipe.safetensors is not a regular file or folder"),
    "source is a device": (lambda d, mp: ["/dev/null", hf_folder(d / "b", state(1)), *W, *out(d)], 2, r"/dev/null is not a regular file or folder"),
    "index points outside the folder": (_index_escape, 2, r"points to '../outside.safetensors', which is not a file name"),
    "index lists a missing shard": (_index_missing, 2, r"lists shard model-00001-of-00002.safetensors, which is missing"),
    "float8 sources": (lambda d, mp: [*two(d, state(0, torch.float8_e4m3fn), state(1, torch.float8_e4m3fn)), *W, *out(d)], 2, r"key '[wb]' of source 0 .* is float8_e4m3fn: only float16/bfloat16/float32/float64"),
    "complex sources": (lambda d, mp: [*two(d, state(0) | {"c": torch.ones(2, dtype=torch.complex64)}, state(1) | {"c": torch.zeros(2, dtype=torch.complex64)}), *W, *out(d)], 2, r"key 'c' of source 0 .* is complex64: complex tensors cannot be souped"),
    "NaN in a source": (_nonfinite(float("nan")), 2, r"key 'w' of source 1 .*b\) holds non-finite values \(1 NaN of 16\)"),
    "inf in a source": (_nonfinite(float("-inf")), 2, r"key 'w' of source 1 .* \(1 inf of 16\).*--allow-nonfinite"),
    "--dtype float16 overflows": (lambda d, mp: [*two(d, state(0) | {"w": torch.full((4, 4), 1e6)}), *W, "--dtype", "float16", *out(d)], 2, r"key 'w': the soup overflows float16 \(cast to float16\)"),
    "extrapolation overflows": (lambda d, mp: [*two(d, state(0, torch.float16) | {"w": torch.full((4, 4), -6e4).half()}, state(1, torch.float16) | {"w": torch.full((4, 4), 6e4).half()}), "--weights", "-1", "2", "--allow-extrapolation", *out(d)], 2, r"key 'w': the soup overflows float16"),
    "adapters mixed with full weights": (lambda d, mp: [hf_folder(d / "a", state(0)), adapter(d / "l", 1), *W, *out(d)], 2, r"sources mix PEFT adapter folders"),
    "--mode with full weights": (lambda d, mp: [*two(d), *W, "--mode", "delta", *out(d)], 2, r"--mode applies to LoRA adapter folders only"),
    "--base with full weights": (lambda d, mp: [*two(d), *W, "--base", base(d / "B"), *out(d)], 2, r"--base is theta_0 for the task-vector methods; --method linear does not use it"),
    "--base is an adapter": (lambda d, mp: [adapter(d / "l1", 1), adapter(d / "l2", 2), *W, "--base", adapter(d / "l3", 3), *out(d)], 2, r"--base .*l3 is an adapter folder"),
    "adapter config not JSON": (lambda d, mp: [adapter(d / "l1", 1), (adapter(d / "l2", 2), (d / "l2" / "adapter_config.json").write_text("{"))[0], *W, *out(d)], 2, r"cannot read .*l2/adapter_config.json"),
    "adapter config a list": (lambda d, mp: [adapter(d / "l1", 1), (adapter(d / "l2", 2), (d / "l2" / "adapter_config.json").write_text("[]"))[0], *W, *out(d)], 2, r"adapter_config.json must hold a JSON object"),
    "adapter ranks differ (factors)": (_lora_rank, 2, r"has r=4 but adapter 0 .* has 2: mode 'factors' needs them equal"),
    "NaN in an adapter": (_lora_nan, 2, r"lora_A.weight' of adapter 1 .*l2\) holds non-finite values \(8 NaN of 8\)"),
    "disk full (patched writer)": (_disk_full_patched, 1, r"cannot write the soup to .*soup: No space left on device \(nothing was written\)"),
    "disk full (small tmpfs)": (_disk_full_tmpfs, 1, r"cannot write the soup to .*soup: No space left on device"),
    "output in use by another process": (_in_use, 2, None),
}



def run_cli(args) -> tuple[int | None, str, str, BaseException | None]:
    from rs_lightning import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    code, exc = None, None
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli.main(["soup", *map(str, args)])
        except BaseException as err:  # noqa: BLE001 - a traceback is what this harness counts
            if type(err).__name__ == "Hang":
                raise
            exc = err
    return code, stdout.getvalue(), stderr.getvalue(), exc


def classify(name: str, d: Path, mp) -> tuple[str, str]:
    """Run one CLI case in folder `d`; return (category, detail)."""
    builder, code, regex = CLI_CASES[name]
    built = builder(d, mp)
    args, regex = built if isinstance(built, tuple) else (built, regex)
    before = snapshot(d)
    got, _, err, exc = run_cli(args)
    lines = [line for line in err.splitlines() if line.strip()]
    after = snapshot(d)
    left = f" [+leftover: {sorted({c[0] for c in set(after.items()) ^ set(before.items())})[:3]}]" if after != before else ""
    if exc is not None:
        return "traceback", f"{type(exc).__name__}: {exc}{left}"
    if (d / MARKER).exists() or Path(MARKER).exists():
        return "code ran", f"a hostile pickle ran{left}"
    if got == 0:
        return "silent", "exit 0"
    if left:
        return "leftover", left
    one_line = len(lines) == 1 and lines[0].startswith("rs soup: error: ") and "Traceback" not in err
    if got != code or not one_line or not re.search(regex, lines[0]):
        return "unclear", f"exit {got}: {err.strip()[:300]}"
    return "clean", lines[0]


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input(name, tmp_path, monkeypatch):
    try:
        category, detail = classify(name, tmp_path, monkeypatch)
    finally:
        while CLEANUPS:
            CLEANUPS.pop().close()
    assert category == "clean", f"{name}: {category}: {detail}"


def _brief(detail: str) -> str:
    """The first 100 characters of a detail, keeping its leftover note."""
    cut = detail.find(" [+leftover")
    return detail if len(detail) <= 100 else detail[:100] + (detail[cut:] if cut > 100 else "")


class Hang(BaseException):
    """No answer in 60 s (e.g. a FIFO source read forever)."""


def _hang(signum, frame):
    raise Hang()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGALRM, _hang)
    tally: dict[str, list[str]] = {}
    for case in API_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                category, detail = classify_api(case, Path(tmp))
            except Exception as err:  # noqa: BLE001 - the setup itself failed
                category, detail = "case not applicable", f"{type(err).__name__}: {err}"
        tally.setdefault(category, []).append(f"API {case}: {_brief(detail)}")
    for case in CLI_CASES:
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            try:
                signal.alarm(60)
                category, detail = classify(case, Path(tmp), mp)
            except pytest.skip.Exception as skip:
                category, detail = "skipped", str(skip)
            except Hang:
                category, detail = "hang", "no answer in 60 s"
            except Exception as err:  # noqa: BLE001 - e.g. an older package without the lock module
                category, detail = "case not applicable", f"{type(err).__name__}: {err}"
            finally:
                signal.alarm(0)
                while CLEANUPS:
                    CLEANUPS.pop().close()
        tally.setdefault(category, []).append(f"{case}: {_brief(detail)}")
    print(f"tried {sum(map(len, tally.values()))}: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(tally.items()))
          + f"; cases that left or destroyed files: {sum('leftover' in i for v in tally.values() for i in v)}")
    for category, items in sorted(tally.items()):
        if category != "clean":
            print(f"\n{category}:\n  " + "\n  ".join(items))
