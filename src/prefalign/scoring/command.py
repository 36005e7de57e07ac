"""The command scorer: runs a user-given command on each response's code.

EXECUTES MODEL-WRITTEN CODE, only when named in a spec. The code (found as for
python_compiles: scoring.builtins.extract_code) is written to FILENAME in a fresh temporary
directory and cmd runs there with output captured (see `last_results`); exit status 0
scores 1.0, anything else 0.0. A timeout scores 0.0; either way the command's whole process
group is killed when it ends, so nothing it started lingers. Placeholders: {file} the code
file, {dir} the directory, {prompt_file} a file holding the prompt (written only when cmd
names it). Without shell=true no shell runs: cmd is split like a POSIX shell line and each
placeholder stays one argument; a first word "python" means this interpreter
(sys.executable). With network=false the command runs in a new network namespace with no
interface but loopback (Linux `unshare --net --map-root-user`; refused where user namespaces
are not available), so the code cannot reach the network. Nothing else is sandboxed beyond
the temporary directory and the timeout: the code runs with your rights and environment,
so run it in a container.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prefalign.config import option
from prefalign.errors import ConfigError
from prefalign.scoring.base import Scorer
from prefalign.scoring.code import extract_code


@dataclass(frozen=True)
class CommandParams:
    """command(...): 1 when cmd exits 0 on the response's code."""

    cmd: str = option("python {file}", "the command line; {file}, {dir}, {prompt_file} are "
                      "replaced")
    timeout: float = option(10.0, "seconds before the command is killed and scores 0")
    shell: bool = option(False, "run cmd through the shell")
    filename: str = option("solution.py", "the code file's name in the temporary directory")
    workers: int = option(1, "responses checked at once")
    network: bool = option(True, "false: no network for the command (a new network "
                           "namespace, Linux only)")


@dataclass
class CommandResult:
    """One run of the command scorer; returncode None means it was killed at the timeout."""

    returncode: int | None
    output: str  # stdout and stderr interleaved, the last 4000 characters

    @property
    def passed(self) -> bool:
        return self.returncode == 0


class Command(Scorer):
    """Runs a user-given command on each response's code (see the module docstring)."""

    def __init__(self, cmd: str = "python {file}", timeout: float = 10.0, shell: bool = False,
                 filename: str = "solution.py", workers: int = 1, network: bool = True):
        if timeout <= 0 or workers < 1:
            raise ConfigError(f"command: need timeout > 0 and workers >= 1, got "
                              f"timeout={timeout}, workers={workers}")
        if not filename or Path(filename).name != filename or filename == "prompt.txt":
            raise ConfigError(f"command: filename must be a plain file name, got {filename!r}")
        try:
            self.argv = shlex.split(cmd)
        except ValueError as e:
            raise ConfigError(f"command: cannot split cmd {cmd!r}: {e}") from None
        if not self.argv:
            raise ConfigError("command: cmd is empty; e.g. command(cmd='python {file}')")
        self.cmd, self.timeout, self.shell = cmd, timeout, shell
        self.filename, self.workers, self.network = filename, workers, network
        if not network:
            _check_no_network()
        self.last_results: list[CommandResult] = []  # kept to show why responses failed

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        with ThreadPoolExecutor(self.workers) as pool:  # threads only wait on processes
            self.last_results = list(pool.map(self.run, prompts, responses))
        return [1.0 if r.passed else 0.0 for r in self.last_results]

    def run(self, prompt: str, response: str) -> CommandResult:
        with tempfile.TemporaryDirectory(prefix="prefalign-score-") as tmp:
            file = Path(tmp) / self.filename
            file.write_text(extract_code(response), encoding="utf-8")
            places = {"{file}": str(file), "{dir}": tmp}
            if "{prompt_file}" in self.cmd:
                places["{prompt_file}"] = str(Path(tmp) / "prompt.txt")
                Path(places["{prompt_file}"]).write_text(prompt, encoding="utf-8")
            return self._run(self._command(places), tmp)

    def _command(self, places: dict[str, str]) -> str | list[str]:
        if self.shell:
            line = self.cmd
            for key, value in places.items():
                line = line.replace(key, shlex.quote(value))
            return line if self.network else [*NO_NETWORK, "/bin/sh", "-c", line]
        argv = []
        for arg in self.argv:
            for key, value in places.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        if argv[0] == "python":  # the same interpreter and packages as prefalign
            argv[0] = sys.executable
        return argv if self.network else [*NO_NETWORK, *argv]

    def _run(self, command: str | list[str], cwd: str) -> CommandResult:
        try:
            # A new session gives the command its own process group, so a timeout can
            # kill everything it started, not only the direct child.
            proc = subprocess.Popen(
                command, cwd=cwd, shell=isinstance(command, str), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise ConfigError(f"command: cannot run {self.argv[0]!r} (from cmd {self.cmd!r}): "
                              f"{e.strerror or e}") from None
        try:
            out, _ = proc.communicate(timeout=self.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a detached grandchild holds the pipe open
                out = b""
        finally:
            _kill_group(proc)  # nothing it started outlives its score, even on Ctrl-C
        return CommandResult(code, out.decode("utf-8", "replace")[-4000:])


# A new user namespace (mapped to root inside, so no privilege is needed) owning a new
# network namespace: only a loopback interface, which is down.
NO_NETWORK = ("unshare", "--net", "--map-root-user")


def _check_no_network() -> None:
    """Refuse network=false now, in one line, where the namespace cannot be made."""
    try:
        done = subprocess.run([*NO_NETWORK, "true"], capture_output=True, timeout=30)
        problem = done.stderr.decode("utf-8", "replace").strip() if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem:
        raise ConfigError(f"command: network=false needs `{' '.join(NO_NETWORK)}` (Linux "
                          f"user namespaces), which fails here ({problem.splitlines()[-1]}); "
                          "run the scorer inside a container without network instead")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass  # it ended on its own in the meantime
