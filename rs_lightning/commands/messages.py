"""How the `rs` commands report a failure: one line "rs <command>: error: ...", an exit code, no traceback.

Exit codes: 2 for what the user can fix (arguments, config, inputs, an output location, a folder another
process is writing); 1 when the machine failed a write (disk full, I/O error: `RESOURCE_ERRNOS`).

- `OneLineParser`: argparse without the usage block it prints before each error.
- `one_line`: jsonargparse's multi-line errors ("Parser key ...: Does not validate against any of the Union
  subtypes ...") cut down to the key, the reason and the given value.
- `build_failure`: an error raised while building the model/data/trainer from a config, named by its key.
"""

from __future__ import annotations

import argparse
import re
import sys

# Lines of jsonargparse's union errors that say nothing about the problem (every optional key is a Union with None).
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "- Expected a <class 'NoneType'>", "tip: For details")
_CLASS_PATH = re.compile(r"class_path='([^']+)'")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the problem, with a pointer to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def fail(prog: str, message, code: int = 2) -> int:
    """Print "PROG: error: MESSAGE" (its first non-empty line) on stderr; return `code`."""
    lines = [line for line in str(message).splitlines() if line.strip()] or [type(message).__name__]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    return code


def one_line(message: str) -> str:
    """A jsonargparse error message on one line: the key, the reasons that are not noise, the value given."""
    parts: list[str] = []
    for raw in str(message).splitlines():
        line = raw.strip()
        if not line or line.startswith(_NOISE):
            continue
        if line.startswith("Given value:"):
            value = line.removeprefix("Given value:").strip()
            if not value.startswith(("NestedArg(", "Namespace(")):
                parts.append(f"(got {value!r})")
            continue
        parts.append(line.removeprefix("- "))
    text = ""
    for part in parts:
        text += part if not text else (" " if text.endswith(":") or part.startswith("(") else "; ") + part
    return text or str(message).strip()


def os_error(err: OSError) -> tuple[str, int]:
    """(message without "[Errno N]", exit code) of a failed write."""
    from rs_lightning.soup.atomic import RESOURCE_ERRNOS

    text = str(err)
    if text.startswith("[Errno"):
        text = text.split("] ", 1)[-1]
    return text, 1 if err.errno in RESOURCE_ERRNOS else 2


def name_config(message: str, argv) -> str:
    """jsonargparse says "Problems parsing config: <yaml error>" without the file: add the --config file(s)."""
    argv = [str(a) for a in argv]
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not paths or "Problems parsing config" not in message:
        return message
    return message.replace("Problems parsing config", f"cannot parse the config {', '.join(paths)}", 1)


def build_failure(err: BaseException, config, keys=("model", "data", "trainer"), default: str = "the config") -> str:
    """The message of an error raised while instantiating a parsed config: which key, which class, why."""
    cause = err.__cause__ if err.__cause__ is not None else err
    reason = one_line(str(cause)) or type(cause).__name__
    m = _CLASS_PATH.search(str(err))
    key = None
    if m is not None:
        for k in keys:
            try:
                if config[k]["class_path"] == m.group(1):
                    key = k
                    break
            except (KeyError, TypeError):
                continue
    what = f"{key} ({m.group(1)})" if key and m else (m.group(1) if m else default)
    return f"{what} cannot be built from this config: {reason}"
