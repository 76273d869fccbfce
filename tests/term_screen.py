"""Run a command in a pseudo-terminal and replay its output on a tiny terminal emulator,
so tests (and the chat capture) see the screen a user would see: cursor moves, line
erases and redraws applied, colours dropped.

Handles what rich, readline and Python's REPL-ish I/O emit: printable text with deferred
autowrap, CR/LF/BS/TAB, CSI cursor moves (A B C D G H f), erases (K J), SGR and private
modes (ignored), and OSC strings (ignored).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
OSC = re.compile(r"\x1b\][^\x07\x1b]*(\x07|\x1b\\)")


class Screen:
    """An endless scrollback of ``width`` columns; the cursor may not rise above the last ``height`` rows."""

    def __init__(self, width: int = 80, height: int = 40):
        self.width, self.height = width, height
        self.lines: list[list[str]] = [[]]
        self.row = self.col = 0
        self.pending_wrap = False

    def _line(self) -> list[str]:
        while len(self.lines) <= self.row:
            self.lines.append([])
        return self.lines[self.row]

    def _top(self) -> int:
        return max(0, len(self.lines) - self.height)

    def _put(self, ch: str) -> None:
        if self.pending_wrap:
            self.row, self.col, self.pending_wrap = self.row + 1, 0, False
        line = self._line()
        while len(line) < self.col:
            line.append(" ")
        if self.col < len(line):
            line[self.col] = ch
        else:
            line.append(ch)
        if self.col == self.width - 1:
            self.pending_wrap = True
        else:
            self.col += 1

    def feed(self, data: str) -> None:
        data = OSC.sub("", data)
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                m = CSI.match(data, i)
                if m:
                    self._csi(m.group(1), m.group(2))
                    i = m.end()
                    continue
                i += 2  # a two-character escape (charset selection, keypad mode, ...)
                continue
            if ch == "\r":
                self.col, self.pending_wrap = 0, False
            elif ch == "\n":
                self.row, self.pending_wrap = self.row + 1, False
                self._line()
            elif ch == "\b":
                self.col, self.pending_wrap = max(0, self.col - 1), False
            elif ch == "\t":
                self.col = min(self.width - 1, (self.col // 8 + 1) * 8)
            elif ch >= " " and ch != "\x7f":
                self._put(ch)
            i += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return  # private modes: cursor visibility, bracketed paste, ...
        nums = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = nums[0] if nums and nums[0] else 1
        self.pending_wrap = False
        if final == "A":
            self.row = max(self._top(), self.row - n)
        elif final == "B":
            self.row += n
        elif final == "C":
            self.col = min(self.width - 1, self.col + n)
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "G":
            self.col = min(self.width - 1, n - 1)
        elif final in "Hf":
            row = nums[0] if nums and nums[0] else 1
            col = nums[1] if len(nums) > 1 and nums[1] else 1
            self.row, self.col = self._top() + row - 1, col - 1
        elif final == "K":
            line, mode = self._line(), nums[0] if nums else 0
            if mode == 0:
                del line[self.col :]
            elif mode == 1:
                line[: self.col + 1] = [" "] * min(len(line), self.col + 1)
            else:
                line.clear()
        elif final == "J":
            mode = nums[0] if nums else 0
            if mode == 0:
                del self._line()[self.col :]
                del self.lines[self.row + 1 :]
            elif mode in (2, 3):
                for line in self.lines[self._top() :]:
                    line.clear()

    def text(self) -> str:
        out = "\n".join("".join(line).rstrip() for line in self.lines)
        return out.rstrip("\n") + "\n"


class PtySession:
    """A child process on a pseudo-terminal of the given size; ``output`` keeps every byte it wrote."""

    def __init__(
        self,
        argv: list[str],
        env: dict | None = None,
        width: int = 80,
        height: int = 40,
        cwd: str | None = None,
    ):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        env = dict(os.environ if env is None else env)
        env.update(TERM="xterm-256color", COLUMNS=str(width), LINES=str(height))
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
        os.close(slave)
        self.master, self.width, self.height = master, width, height
        self.output = b""

    def read(self, timeout: float = 0.1) -> bytes:
        got = b""
        while True:
            ready, _, _ = select.select([self.master], [], [], timeout)
            if not ready:
                return got
            try:
                chunk = os.read(self.master, 65536)
            except OSError as e:
                if e.errno == errno.EIO:  # the child closed the terminal
                    return got
                raise
            if not chunk:
                return got
            got += chunk
            self.output += chunk
            timeout = 0.05

    def mark(self) -> int:
        """A position in the output, for ``expect(..., after=mark)``."""
        return len(self.output)

    def expect(self, needle: str, timeout: float = 60.0, after: int = 0) -> str:
        """Read until ``needle`` appears in the output past byte ``after`` (escape sequences ignored)."""
        deadline = time.monotonic() + timeout
        while needle not in self.text(after):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not seen; got:\n{self.screen()}")
            if not self.read(0.2) and self.proc.poll() is not None:
                raise EOFError(
                    f"process exited ({self.proc.returncode}) before {needle!r}; got:\n{self.screen()}"
                )
        return self.output.decode("utf-8", "replace")

    def text(self, after: int = 0) -> str:
        """The output past byte ``after``, decoded, without escape sequences (not laid out: see screen())."""
        return CSI.sub("", OSC.sub("", self.output[after:].decode("utf-8", "replace")))

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def interrupt(self) -> None:
        """Ctrl-C, as the terminal delivers it: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.1)
        self.read(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            raise TimeoutError(f"process did not exit; screen:\n{self.screen()}")
        os.close(self.master)
        return self.proc.returncode

    def screen(self) -> str:
        screen = Screen(self.width, self.height)
        screen.feed(self.output.decode("utf-8", "replace"))
        return screen.text()
