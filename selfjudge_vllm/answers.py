"""What a response answers, and whether the answer is right: the one definition the
offline labeller, `selfjudge calibrate` and the benchmarks share. Plain Python, no vLLM.

    numeric   the number after the last '####', else the last number of the response,
              normalised ("$1,200.00" -> "1200"); right when it equals the reference's
              normalised number (GSM8K style)
    pattern   the last match of a regex (its first group when it has groups); right when it
              equals the reference after stripping
    code      whether the response's code passes the prompt's tests, run in a fresh
              interpreter with memory, CPU and time limits (HumanEval style); the "answer" is
              pass or fail, so an answer change is a pass/fail flip
    text      the whole response; no notion of right (prompts without references)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ANSWER_KINDS = ("numeric", "pattern", "code", "text")
# The marker the test program prints after the tests ran: an early exit with status 0
# (os._exit, sys.exit in the response's code) skips it and fails.
TESTS_RAN = "__selfjudge_all_tests_ran__"
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def normalise_number(text: str | None) -> str | None:
    """'$1,200.00' -> '1200', '-3.50' -> '-3.5', '7.' -> '7'; None when no number is there."""
    if text is None:
        return None
    match = re.search(_NUMBER, text.replace("$", ""))
    if not match:
        return None
    number = match.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


def numeric_answer(response: str) -> str | None:
    """The number after the last '####'; without one, the last number of the response."""
    if "####" in response:
        return normalise_number(response.split("####")[-1])
    numbers = re.findall(_NUMBER, response.replace("$", ""))
    return normalise_number(numbers[-1]) if numbers else None


def pattern_answer(response: str, pattern: re.Pattern) -> str | None:
    """The last match of `pattern` (its first group when it has groups), or None."""
    matches = pattern.findall(response)
    if not matches:
        return None
    last = matches[-1]
    return last if isinstance(last, str) else last[0]


def _limit_resources():  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
    os.setsid()


def program_passes(program: str, timeout_s: float = 15.0) -> bool:
    """Runs `program` (code, then its tests) in a fresh isolated interpreter in an empty
    temporary folder with memory, CPU and wall-clock limits; True when it ran to the end.
    Model code is untrusted: this is isolation by process, not a sandbox."""
    program = f"{program}\n\nprint({TESTS_RAN!r})\n"
    with tempfile.TemporaryDirectory() as folder:
        # No stdin (an input() fails at once instead of waiting on the terminal); the child
        # leads its own process group, and all of the group dies with it.
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", program], cwd=folder, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit_resources,
            env={"PATH": "/usr/bin:/bin"},
        )
        try:
            stdout, _ = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stdout = None
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # processes the code started
            except ProcessLookupError:
                pass
            child.wait()
    return stdout is not None and child.returncode == 0 and TESTS_RAN in stdout.decode(errors="replace")


def humaneval_passes(problem: dict, completion: str, timeout_s: float = 15.0) -> bool:
    """HumanEval's check: the problem's prompt + the completion, its tests, check(entry point)."""
    return program_passes(f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})",
                          timeout_s)


def response_code(response: str) -> str:
    """The code of a response: its first ```-fenced block when it has one (an unclosed fence
    runs to the end), else the whole response."""
    match = re.search(r"```[^\n`]*\n(.*?)(?:```|\Z)", response, re.S)
    return match.group(1) if match else response


@dataclass(frozen=True)
class AnswerKind:
    """How responses to a prompt set are judged (ANSWER_KINDS); `pattern` for "pattern"."""

    kind: str = "text"
    pattern: str | None = None

    def __post_init__(self):
        if self.kind not in ANSWER_KINDS:
            raise ValueError(f"unknown answer kind {self.kind!r}; known: {', '.join(ANSWER_KINDS)}")
        if (self.kind == "pattern") != (self.pattern is not None):
            raise ValueError("an answer pattern goes with the 'pattern' kind, and only with it")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"answer pattern {self.pattern!r} is not a valid regex ({exc})") from None

    @property
    def reference_field(self) -> str | None:
        """The prompt-file field that says what is right ("answer", "tests"; None for text)."""
        return {"numeric": "answer", "pattern": "answer", "code": "tests"}.get(self.kind)

    def answer(self, response: str, row: dict) -> str | None:
        """What the response answers (compared between a relaxed and a lossless run)."""
        if self.kind == "numeric":
            return numeric_answer(response)
        if self.kind == "pattern":
            return pattern_answer(response, re.compile(self.pattern))
        if self.kind == "code":
            return self.outcome(response, row)["answer"]
        return response

    def correct(self, response: str, row: dict) -> bool | None:
        """Whether the response is right (None: the row says nothing of what is right)."""
        reference = row.get(self.reference_field) if self.reference_field else None
        if reference is None:
            return None
        if self.kind == "numeric":
            answer = numeric_answer(response)
            return answer is not None and answer == normalise_number(str(reference))
        if self.kind == "pattern":
            answer = pattern_answer(response, re.compile(self.pattern))
            return answer is not None and answer.strip() == str(reference).strip()
        return program_passes(f"{row.get('code_prefix', '')}{response_code(response)}\n\n{reference}")

    def outcome(self, response: str, row: dict) -> dict:
        """{"answer", "correct"} of one response (code runs once for both)."""
        if self.kind == "code":
            correct = self.correct(response, row)
            return {"answer": None if correct is None else ("pass" if correct else "fail"), "correct": correct}
        return {"answer": self.answer(response, row), "correct": self.correct(response, row)}
