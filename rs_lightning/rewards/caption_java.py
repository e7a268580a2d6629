"""The Java half of caption evaluation: PTB tokenisation, a long-lived METEOR process, SPICE detection.

- `tokenize_ptb`: pycocoevalcap's PTBTokenizer (one short JVM per call, about 0.2 s), the evaluation path.
- `MeteorScorer`: ONE `java -jar meteor-1.5.jar -stdio` process, started once (about 5 s to load the
  paraphrase table) and reused for every batch, behind a lock, stopped at interpreter exit. It speaks the
  same stdio protocol with the same command line as pycocoevalcap's `Meteor`, so the numbers are the same
  (the tests check this), but it owns the process because pycocoevalcap's wrapper (a) never releases its
  lock when a read fails, (b) pipes stderr without ever reading it, so a chatty JVM can block, and (c) turns
  a dead JVM into `ValueError: could not convert string to float: ''`.
- `spice_available` / `SpiceScorer`: SPICE needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap
  downloads on first use. Offline that download fails deep inside urllib, so we look for the jars first
  and raise `SpiceUnavailableError` naming them; with the jars in place we delegate to pycocoevalcap.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

from rs_lightning.rewards.caption_ngram import check_pairs

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# SCORE lines sent before reading their answers back: pipelining saves a round trip per caption, and 64
# answers (~100 bytes each) stay far below a pipe buffer, so neither side can block on a full pipe.
_METEOR_CHUNK = 64


class JavaNotFoundError(RuntimeError):
    """No `java` executable on PATH."""


class SpiceUnavailableError(RuntimeError):
    """SPICE's Stanford CoreNLP jars are missing (they cannot be downloaded offline)."""


def _pycocoevalcap_dir(subpackage: str) -> Path:
    # find_spec instead of import: locating the jars must not run pycocoevalcap code.
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pycocoevalcap is not installed (pip install pycocoevalcap==1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / subpackage


def require_java(what: str) -> str:
    """Return the path of `java`, or raise a `JavaNotFoundError` that says what needed it.

    Args:
        what: the feature asking, for the message (e.g. "METEOR").
    """
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            f"{what} needs a Java runtime, but no `java` executable is on PATH. Install one "
            "(e.g. `apt-get install openjdk-17-jre-headless`) or use the pure-Python metrics "
            "(bleu1..bleu4, rouge_l, cider_d)."
        )
    return java


def tokenize_ptb(captions: Sequence[str]) -> list[str]:
    """Tokenise captions with pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, `-lowerCase`).

    This is the tokenisation behind the numbers captioning papers report; `caption_text.tokenize` is the
    fast approximation used for rewards.

    Args:
        captions: raw captions.

    Returns:
        One tokenised caption per input, in order.

    Raises:
        JavaNotFoundError: no `java` on PATH.
    """
    require_java("The PTB tokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not captions:
        return []
    # One key per caption keeps the order and lets us check that every line came back.
    tokenized = PTBTokenizer().tokenize({i: [{"caption": caption}] for i, caption in enumerate(captions)})
    if len(tokenized) != len(captions):
        raise RuntimeError(f"PTBTokenizer returned {len(tokenized)} lines for {len(captions)} captions")
    return [tokenized[i][0] for i in range(len(captions))]


def _stop_process(process: subprocess.Popen, stderr_file) -> None:
    # Module-level (not a method) so weakref.finalize holds no reference to the scorer itself.
    try:
        if process.stdin is not None:
            process.stdin.close()
    except OSError:
        pass
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdout, stderr_file):
        if stream is not None:
            stream.close()


class MeteorScorer:
    """METEOR 1.5 through one long-lived JVM, thread-safe, closed at exit (or by `close()`).

    Same command as pycocoevalcap's `Meteor`: `java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`.
    Creating the object starts the JVM; the first `compute_score` waits for the paraphrase table (~5 s).

    Args:
        max_heap: the JVM's `-Xmx` value.
    """

    def __init__(self, max_heap: str = "2G") -> None:
        java = require_java("METEOR")
        meteor_dir = _pycocoevalcap_dir("meteor")
        if not (meteor_dir / "meteor-1.5.jar").is_file():
            raise FileNotFoundError(f"meteor-1.5.jar not found in {meteor_dir}")
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()
        self.command = [java, "-jar", f"-Xmx{max_heap}", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        self._process = subprocess.Popen(
            self.command, cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self._finalizer = weakref.finalize(self, _stop_process, self._process, self._stderr)

    @property
    def pid(self) -> int:
        """Process id of the METEOR JVM (the same for the scorer's whole life)."""
        return self._process.pid

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the JVM. Idempotent."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _died(self, while_doing: str) -> RuntimeError:
        self._stderr.seek(0)
        tail = self._stderr.read()[-2000:].decode(errors="replace")
        return RuntimeError(
            f"the METEOR JVM (pid {self.pid}) stopped answering while {while_doing}; "
            f"exit code {self._process.poll()}; stderr tail:\n{tail}"
        )

    def _send(self, lines: Sequence[str]) -> None:
        try:
            self._process.stdin.write("".join(line + "\n" for line in lines).encode())
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise self._died("receiving input") from error

    def _read(self, count: int, while_doing: str) -> list[str]:
        answers = []
        for _ in range(count):
            line = self._process.stdout.readline()
            if not line:
                raise self._died(while_doing)
            answers.append(line.decode().strip())
        return answers

    def compute_score(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """METEOR of a batch: the corpus score (METEOR over pooled statistics) and one score per caption.

        Args:
            candidates: N captions (pycocoevalcap feeds PTB-tokenised text; `-norm` also normalises).
            references: N non-empty lists of references.

        Returns:
            `(corpus_score, per_caption_scores)`, as pycocoevalcap's `Meteor.compute_score`.
        """
        check_pairs(candidates, references)
        if not candidates:
            return 0.0, []
        score_lines = []
        for cand, refs in zip(candidates, references):
            # pycocoevalcap's hypothesis clean-up, plus newlines and "|||" anywhere: they break the protocol.
            hyp = _one_line(cand).replace("|||", "").replace("  ", " ")
            score_lines.append(
                " ||| ".join(("SCORE", " ||| ".join(_one_line(r).replace("|||", "") for r in refs), hyp))
            )
        with self._lock:
            if self.closed:
                raise RuntimeError("this MeteorScorer is closed")
            stats = []
            for start in range(0, len(score_lines), _METEOR_CHUNK):
                chunk = score_lines[start : start + _METEOR_CHUNK]
                self._send(chunk)
                stats.extend(self._read(len(chunk), "computing statistics"))
            self._send(["EVAL ||| " + " ||| ".join(stats)])
            answers = self._read(len(stats) + 1, "computing scores")
        return float(answers[-1]), [float(a) for a in answers[:-1]]

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """Per-caption METEOR scores."""
        return self.compute_score(candidates, references)[1]


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


_shared_meteor: MeteorScorer | None = None
_shared_meteor_lock = threading.Lock()


def shared_meteor_scorer() -> MeteorScorer:
    """The process-wide `MeteorScorer`, started on first use and reused (restarted if it was closed).

    Every `MeteorScorer` stops its JVM at interpreter exit through its `weakref.finalize`, this one included.
    """
    global _shared_meteor
    with _shared_meteor_lock:
        if _shared_meteor is None or _shared_meteor.closed:
            _shared_meteor = MeteorScorer()
        return _shared_meteor


def spice_lib_dir() -> Path:
    """Where SPICE looks for the Stanford CoreNLP jars: `pycocoevalcap/spice/lib`."""
    return _pycocoevalcap_dir("spice") / "lib"


def spice_missing_jars() -> list[Path]:
    """The CoreNLP jars SPICE needs that are not in `spice_lib_dir()`."""
    lib = spice_lib_dir()
    return [lib / name for name in CORENLP_JARS if not (lib / name).is_file()]


def spice_available() -> bool:
    """True when SPICE can run here: `java` on PATH and both CoreNLP 3.6.0 jars in place."""
    return shutil.which("java") is not None and not spice_missing_jars()


class SpiceScorer:
    """SPICE through pycocoevalcap, refused up front (no download attempt) when its jars are missing.

    Raises:
        JavaNotFoundError: no `java` on PATH.
        SpiceUnavailableError: the Stanford CoreNLP 3.6.0 jars are not in `spice_lib_dir()`.
    """

    def __init__(self) -> None:
        require_java("SPICE")
        if spice_missing_jars():
            lib = spice_lib_dir()
            raise SpiceUnavailableError(
                f"SPICE needs Stanford CoreNLP 3.6.0 jars in {lib}: {' and '.join(CORENLP_JARS)}; "
                "they cannot be downloaded offline; place them there to enable SPICE "
                "(they are in stanford-corenlp-full-2015-12-09.zip)."
            )
        # SPICE writes its temp and cache folders next to spice-1.0.jar; fail now rather than after parsing.
        if not os.access(spice_lib_dir().parent, os.W_OK):
            raise SpiceUnavailableError(f"SPICE needs write access to {spice_lib_dir().parent} (tmp/ and cache/)")
        # Safe now: pycocoevalcap's Spice() only downloads when the first jar is absent.
        from pycocoevalcap.spice.spice import Spice

        self._spice = Spice()

    def compute_score(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """SPICE F-score: the corpus mean and one score per caption (pycocoevalcap's "All" f)."""
        check_pairs(candidates, references)
        gts = {i: list(refs) for i, refs in enumerate(references)}
        res = {i: [cand] for i, cand in enumerate(candidates)}
        average, details = self._spice.compute_score(gts, res)
        return float(average), [float(d["All"]["f"]) for d in details]

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """Per-caption SPICE F-scores."""
        return self.compute_score(candidates, references)[1]
